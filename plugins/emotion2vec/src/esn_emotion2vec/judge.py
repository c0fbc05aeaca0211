"""emotion2vec+ as an esn judge: funasr's real ``AutoModel`` path, offline, without side effects.

emotion2vec+ scores 9 classes (``tokens.txt`` order in the released models: angry, disgusted, fearful,
happy, neutral, other, sad, surprised, <unk>). ``mapping`` decides the label:

- ``"all9"`` (default, the paper's protocol: "we directly use the predicted label"): argmax over all
  9 classes. A disgusted/fearful/other/unknown winner is returned under its own name, which is
  outside the five target emotions and therefore never matches a target: a miss, never a guess.
- ``"five"``: argmax restricted to neutral/happy/angry/sad/surprise; always one of the five.

funasr side effects are contained: no update check (``disable_update``), no progress bars, the torch
thread count and the root logger (funasr calls ``logging.basicConfig``) are restored after every call,
and funasr's prints go to stderr so that ``esn judge --json`` stays clean.

No code from a model folder runs without the ``trust_remote_code`` option. funasr merges a folder's
``config.yaml`` over its caller's arguments, and with ``trust_remote_code: true`` there it pip-installs
the folder's ``requirements.txt`` and imports its ``remote_code`` (``funasr.download.download_model_from_hub``);
``vad_model``/``punc_model``/``spk_model`` keys build further models. esn passes ``trust_remote_code``
itself (arguments win over the folder's config in funasr's merge) and intercepts funasr's
``download_model`` (called by ``AutoModel.build_model``) to check the resolved configuration before
any model is built (``check_resolved``), including the ``feature_encoder_spec`` string that funasr
``eval``s (only list and tuple literals of numbers pass). Every ``torch.load`` funasr makes runs with
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (torch >= 2.4), so ``model.pt`` is never unpickled, whatever the
torch version's default.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from esn.audio import MODEL_RATE, prepare_audio
from esn.emotions import EMOTIONS
from esn.errors import EsnError
from esn.judges import Audio, Judge, Judgement

DEFAULT_MODEL = "iic/emotion2vec_plus_large"
MAPPINGS = ("all9", "five")
REQUIRED_FILES = ("config.yaml", "model.pt", "tokens.txt")
_ALIASES = {"surprised": "surprise", "<unk>": "unknown"}


def class_name(token: str) -> str:
    """``"吃惊/surprised"`` -> ``"surprise"``: the English part, lower case, in esn's vocabulary."""
    english = token.split("/")[-1].strip().lower()
    return _ALIASES.get(english, english)


def pick_label(scores: dict[str, float], mapping: str) -> str:
    """The winning class under ``mapping`` (see the module docstring)."""
    pool = scores if mapping == "all9" else {k: v for k, v in scores.items() if k in EMOTIONS}
    return max(pool, key=pool.__getitem__)


@contextlib.contextmanager
def contained(threads: int) -> Iterator[None]:
    """Run funasr code with ``threads`` torch threads and give back logging, threads and stdout as found.

    funasr calls ``logging.basicConfig`` (which configures an empty root logger) and
    ``torch.set_num_threads``; a temporary NullHandler makes basicConfig a no-op.
    """
    import torch

    root = logging.getLogger()
    handlers, level, before = list(root.handlers), root.level, torch.get_num_threads()
    guard = logging.NullHandler()
    root.addHandler(guard)
    torch.set_num_threads(threads)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(before)


def check_directory(directory: Path) -> None:
    """A local emotion2vec directory must hold funasr's three files; say which one is missing."""
    if not directory.is_dir():
        raise EsnError(f"emotion2vec model directory not found: {directory}")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
        raise EsnError(
            f"{directory} is not an emotion2vec (funasr) directory: missing {', '.join(missing)} "
            f"(found {found}); download iic/emotion2vec_plus_large or write one with "
            "Emotion2vecJudge.write_tiny"
        )


# config keys that make funasr run code from the folder, install packages, or build further models
REMOTE_CODE_KEYS = ("trust_remote_code", "remote_code")
EXTRA_MODEL_KEYS = ("vad_model", "punc_model", "spk_model")


def remote_code_requests(folder: Path) -> list[str]:
    """What a model folder asks funasr to run or install: code keys in the config files funasr reads
    (``config.yaml``, or the one ``configuration.json`` names), and a ``requirements.txt`` beside them."""
    import yaml

    configs = [folder / "config.yaml"]
    try:
        meta = json.loads((folder / "configuration.json").read_text(encoding="utf-8"))
        named = meta.get("file_path_metas", {}).get("config") if isinstance(meta, dict) else None
        if isinstance(named, str):
            configs.append(folder / named)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        pass
    asks = []
    for path in configs:
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # funasr reports an unreadable config itself
        if isinstance(config, dict):
            asks += [f"{k}: {config[k]!r} in {path.name}" for k in REMOTE_CODE_KEYS if config.get(k)]
    if asks and (folder / "requirements.txt").exists():
        asks.append("requirements.txt, which funasr would pip-install")
    return asks


def check_resolved(kwargs: dict, trust_remote_code: bool) -> None:
    """The configuration funasr resolved for a model folder (its config merged with esn's arguments),
    checked before any model is built."""
    folder = Path(str(kwargs.get("model_path") or ""))
    where = str(folder) if folder.name else str(kwargs.get("model"))
    if not trust_remote_code:
        asks = remote_code_requests(folder) if folder.is_dir() else []
        if kwargs.get("remote_code") and not asks:
            asks = [f"remote_code: {kwargs['remote_code']!r}"]
        if asks:
            raise EsnError(
                f"emotion2vec model {where} asks to run or install code ({'; '.join(asks)}); esn does not run "
                "code from a judge folder unless you opt in: judge option trust_remote_code = true (command "
                "line: --option trust_remote_code=true), only for a folder you trust")
    spec = (((kwargs.get("model_conf") or {}).get("modalities") or {}).get("audio") or {}).get("feature_encoder_spec")
    if spec is not None and not trust_remote_code and not is_literal_spec(spec):
        raise EsnError(
            f"emotion2vec model {where}: its feature_encoder_spec {str(spec)[:80]!r} is not a plain list of "
            "(channels, kernel, stride) tuples, and funasr runs it through eval(); esn runs no code from a judge "
            "folder unless you opt in: judge option trust_remote_code = true")
    extra = [k for k in EXTRA_MODEL_KEYS if kwargs.get(k)]
    if extra:
        raise EsnError(f"emotion2vec model {where}: its config asks for further models ({', '.join(extra)}); "
                       "an emotion judge is one Emotion2vec model")
    if kwargs.get("model") != "Emotion2vec":
        raise EsnError(f"{where} holds a funasr {kwargs.get('model')!r} model, not Emotion2vec")
    init = kwargs.get("init_param")
    if init and folder.is_dir() and Path(str(init)).resolve().parent != folder.resolve():
        raise EsnError(f"emotion2vec model {where}: its config points init_param outside the folder ({init})")


def is_literal_spec(spec: object) -> bool:
    """Whether ``spec`` is the feature-encoder spec of a released model: list and tuple literals of numbers
    joined by ``+`` and ``*`` (``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``), nothing funasr's ``eval`` could run."""
    allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Mult, ast.List, ast.Tuple, ast.Constant, ast.Load)
    try:
        tree = ast.parse(str(spec), mode="eval")
    except (SyntaxError, ValueError):
        return False
    return all(isinstance(node, allowed) and (not isinstance(node, ast.Constant) or type(node.value) in (int, float))
               for node in ast.walk(tree))


@contextlib.contextmanager
def guarded_funasr(trust_remote_code: bool) -> Iterator[None]:
    """Load through funasr with ``check_resolved`` between its download step and its model build, and
    ``torch.load`` in weights-only mode throughout; both undone afterwards."""
    import funasr.auto.auto_model as auto_model

    original = auto_model.download_model

    def download_then_check(**kwargs):
        resolved = original(**kwargs)
        check_resolved(resolved, trust_remote_code)
        return resolved

    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    auto_model.download_model = download_then_check
    try:
        yield
    finally:
        auto_model.download_model = original
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def checkpoint_mismatch(model: Any, checkpoint: Path) -> list[str]:
    """Model keys that ``checkpoint`` lacks or holds with another shape (funasr only warns about them).

    ``model.pt`` is a torch checkpoint; it is read as funasr reads it, with ``torch.load`` in its
    ``weights_only`` mode (tensors and plain containers only, no code), memory-mapped.
    """
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    for key in ("state_dict", "model_state_dict", "model"):  # funasr's own unwrapping order
        if isinstance(state, dict) and key in state:
            state = state[key]
    if not isinstance(state, dict):
        return ["<checkpoint is not a state dict>"]
    bad = []
    for name, tensor in model.state_dict().items():
        src = state.get(name, state.get(f"module.{name}"))
        if src is None or tuple(src.shape) != tuple(tensor.shape):
            bad.append(name)
    return bad


class Emotion2vecJudge(Judge):
    """emotion2vec+ (default ``iic/emotion2vec_plus_large``): a label and 9 class scores per utterance."""

    name: ClassVar[str] = "emotion2vec"
    kind: ClassVar[str] = "emotion"
    labels: ClassVar[tuple[str, ...]] = EMOTIONS

    def __init__(self, model: Any, classes: list[str], *, mapping: str = "all9", threads: int = 1):
        if mapping not in MAPPINGS:
            raise EsnError(f"emotion2vec mapping {mapping!r} is unknown: use one of {', '.join(MAPPINGS)}")
        self.model = model  # a funasr AutoModel
        self.classes = classes
        self.mapping = mapping
        self.threads = threads

    @classmethod
    def load(
        cls,
        source: str | None = None,
        *,
        device: str = "cpu",
        mapping: str = "all9",
        hub: str = "hf",
        threads: int | None = None,
        trust_remote_code: bool = False,
        **options: Any,
    ) -> Emotion2vecJudge:
        """Load a local funasr directory (config.yaml, model.pt, tokens.txt) or a hub id.

        ``hub`` is funasr's: ``"hf"`` (also used for local directories; funasr maps the default id to
        ``emotion2vec/emotion2vec_plus_large``) or ``"ms"`` (ModelScope). A hub id downloads unless cached.
        ``threads`` is the torch thread count used while funasr runs (default: the current one).
        ``trust_remote_code`` lets a folder that asks for it run its code and install its requirements
        (funasr's own feature); without it such a folder is refused.
        """
        cls.check_options({"mapping": mapping, "hub": hub, "threads": threads,
                           "trust_remote_code": trust_remote_code, **options})
        import torch

        threads = threads or torch.get_num_threads()
        source = source or DEFAULT_MODEL
        local = Path(source).expanduser()
        is_local = local.exists() or source.startswith((".", "/", "~"))
        if is_local:
            check_directory(local)
            source = str(local)
            hub = "hf"  # funasr reads a local directory on its hf path
        with contained(threads):
            from funasr import AutoModel

            try:
                with guarded_funasr(trust_remote_code):
                    model = AutoModel(
                        model=source, hub=hub, device=device, ncpu=threads, disable_update=True,
                        disable_pbar=True, disable_log=True, log_level="ERROR", trust_remote_code=trust_remote_code,
                    )
            except EsnError:
                raise
            except pickle.UnpicklingError as exc:  # from torch.load in weights-only mode
                reason = str(exc).partition("WeightsUnpickler error:")[2].strip().split(". ")[0] or "not a checkpoint"
                raise EsnError(f"funasr could not load emotion2vec from {source}: its checkpoint cannot be read in "
                               "torch's weights-only mode, which allows tensors and plain containers only and runs "
                               f"no code from the file ({reason})") from None
            except Exception as exc:  # funasr raises assertions, KeyErrors, RuntimeErrors...
                raise EsnError(f"funasr could not load emotion2vec from {source}: {type(exc).__name__}: {exc}") from None
        if type(model.model).__name__ != "Emotion2vec":
            raise EsnError(f"{source} holds a funasr {type(model.model).__name__} model, not Emotion2vec")
        init = Path(model.kwargs.get("init_param") or "")
        if init.is_file():
            bad = checkpoint_mismatch(model.model, init)
            if bad:
                raise EsnError(
                    f"{init} does not fit the Emotion2vec model of its config.yaml: {len(bad)} weights "
                    f"missing or of another shape (e.g. {', '.join(bad[:3])}); it is another model's checkpoint"
                )
        classes = [class_name(t) for t in (model.kwargs.get("token_list") or [])]
        absent = [e for e in EMOTIONS if e not in classes]
        if absent or model.model.proj is None or model.model.proj.out_features != len(classes):
            raise EsnError(
                f"{source}: the classifier classes {classes} do not cover {', '.join(absent) or 'the head'}; "
                "tokens.txt must list emotion2vec+'s 9 classes (e.g. 生气/angry ... 吃惊/surprised, <unk>)"
            )
        return cls(model, classes, mapping=mapping, threads=threads)

    @classmethod
    def check_options(cls, options) -> None:
        super().check_options(options)
        if options.get("mapping", "all9") not in MAPPINGS:
            raise EsnError(f"emotion2vec mapping {options['mapping']!r} is unknown: use one of {', '.join(MAPPINGS)}")
        if options.get("hub", "hf") not in ("hf", "ms"):
            raise EsnError(f"emotion2vec hub {options['hub']!r} is unknown: use hf or ms")
        if options.get("threads") is not None and options["threads"] < 1:
            raise EsnError(f"emotion2vec threads must be >= 1, got {options['threads']}")

    def judge(self, audios: Sequence[Audio], *, sources: Sequence[Audio] | None = None) -> list[Judgement]:
        """Label each audio. ``sources`` are not used: emotion2vec+ judges the converted speech alone."""
        waves = [
            prepare_audio(a.samples, a.sample_rate, target_rate=MODEL_RATE, name=a.name or f"audio {i}")
            for i, a in enumerate(audios)
        ]
        if not waves:
            return []
        with contained(self.threads):
            # one call for the whole list; results come back in input order (funasr's keys are not used)
            results = self.model.generate(waves, fs=MODEL_RATE, granularity="utterance", extract_embedding=False)
        if len(results) != len(waves):
            raise EsnError(f"emotion2vec returned {len(results)} results for {len(waves)} inputs")
        out = []
        for res in results:
            scores = {class_name(lab): float(s) for lab, s in zip(res["labels"], res["scores"], strict=True)}
            if not all(np.isfinite(v) for v in scores.values()):
                out.append(Judgement(None, scores, raw="non-finite scores"))
                continue
            out.append(Judgement(pick_label(scores, self.mapping), scores))
        return out

    @classmethod
    def write_tiny(cls, directory: str | Path, seed: int = 0) -> Path:
        """Write a tiny random emotion2vec directory (config.yaml, model.pt, tokens.txt) that ``load`` reads."""
        from esn_emotion2vec.tiny import write_tiny

        return write_tiny(Path(directory), seed=seed)
