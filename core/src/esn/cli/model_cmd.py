"""``esn hookpoints`` and ``esn convert``: model-agnostic commands that go through the adapter registry."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from esn.cli.argtypes import command_line
from esn.cli.ui import console, note, print_table, status
from esn.display import printable
from esn.errors import EsnError, UsageError


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter name (`esn adapters list`)")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default auto)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow checkpoints that run their own Python (MiniCPM-o, Kimi-Audio)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``hookpoints`` and ``convert``."""
    hp = sub.add_parser("hookpoints", help="list a model's hook points (gate tensors) with their widths")
    _model_args(hp)
    hp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    hp.set_defaults(func=cmd_hookpoints)

    cv = sub.add_parser("convert", help="convert the emotion of one speech file (EVC) and print the decoded text")
    cv.add_argument("input", type=Path, help="source speech: any rate, mono or multi-channel (averaged)")
    _model_args(cv)
    cv.add_argument("--emotion", required=True, help="target emotion: happy, angry, sad, surprise or neutral")
    cv.add_argument("-o", "--output", type=Path, required=True, help="where to write the converted speech (wav)")
    cv.add_argument("--seed", type=int, default=0, help="seed of the speech decoder's noise (default 0)")
    cv.add_argument("--speaker", default=None, help="output voice (adapter default if omitted)")
    cv.add_argument("--system-prompt", default=None, help="a preset name of the adapter or literal text")
    cv.add_argument("--max-new-tokens", type=int, default=256, help="cap on text tokens")
    cv.add_argument("--max-audio-tokens", type=int, default=1024, help="cap on speech tokens")
    cv.add_argument("--mask", type=Path, default=None, help="ESN mask file (safetensors, from `esn select`)")
    cv.add_argument("--mask-emotion", default=None, help="which emotion's mask to apply (default: --emotion)")
    cv.add_argument("--method", default=None, help="intervention with --mask: steer, add, clamp, deactivate (default steer)")
    cv.add_argument("--alpha", type=float, default=None, help="intervention strength with --mask (default 1.0)")
    cv.add_argument("--json", action="store_true",
                    help="print the decoded text, output file and settings as JSON instead of the text")
    cv.set_defaults(func=cmd_convert)


def check_model_args(args: argparse.Namespace):
    """Everything about the model that can be checked before loading it; returns the adapter class."""
    from esn.adapters import check_dtype
    from esn.devices import check_device
    from esn.hub import prepare_source
    from esn.plugins import registry

    with command_line():
        cls = registry().adapter(args.adapter)
        check_dtype(args.dtype)
        check_device(args.device)
    prepare_source(args.model)  # a model that is not there is not a usage error (exit 1)
    return cls


def load_adapter(args: argparse.Namespace, cls=None):
    """The adapter named on the command line, loaded with a spinner (errors name the model)."""
    cls = cls or check_model_args(args)
    with status(f"loading {args.model} with adapter {args.adapter}"):
        return cls.load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


def cmd_hookpoints(args: argparse.Namespace) -> int:
    """``esn hookpoints``: the model's hook points as a table or JSON."""
    from rich.table import Table

    adapter = load_adapter(args)
    layout = adapter.layout()
    rows = [{"name": p.name, "kind": _kind(p), "width": p.width, "module": p.module, "down_proj": p.down_proj,
             "meta": dict(p.meta), **({"experts": p.experts, "top_k": p.top_k} if p.routed else {}),
             **({"indices": p.indices, "index_from": p.index_from} if p.indexed else {}),
             **({"fused": p.fused} if p.fused else {})} for p in layout]  # fused: the module is injected (esn.fused)
    if args.json:
        print(json.dumps({"adapter": args.adapter, "model": str(args.model), "fingerprint": layout.fingerprint,
                          "n_neurons": layout.n_neurons, "hook_points": rows}, indent=2, default=str))
        return 0
    table = Table(title=f"{args.adapter} hook points ({layout.n_neurons} neurons, layout {layout.fingerprint})")
    routed = layout.routed
    metas = any(r["meta"] for r in rows)
    indexed = layout.indexed
    for col, justify in (("name", "left"), ("kind", "left"), ("width", "right"),
                         *([("experts", "right")] if routed else []), *([("indices", "right")] if indexed else []),
                         ("module", "left"), ("down_proj", "left"), *([("meta", "left")] if metas else [])):
        table.add_column(col, justify=justify)
    for r in rows:  # routed: width = experts x units, each token uses top_k of them; indexed: indices x units
        experts = [f"{r['experts']} x {r['width'] // r['experts']}, top {r['top_k']}" if "experts" in r else ""]
        indices = [f"{r['indices']} x {r['width'] // r['indices']}" if "indices" in r else ""]
        meta = [", ".join(f"{k}={v}" for k, v in r["meta"].items())]
        table.add_row(r["name"], r["kind"], str(r["width"]), *(experts if routed else []),
                      *(indices if indexed else []), r["module"], r["down_proj"] or "-", *(meta if metas else []))
    print_table(table)  # module paths are never cut, whatever the terminal width
    return 0


def _kind(hp) -> str:
    """A hook point's kind: ``routed`` for experts, else its ``kind`` field where it has one, else ``dense``."""
    return "routed" if hp.routed else str(getattr(hp, "kind", "") or "dense")


def check_output(path: Path, source: Path) -> None:
    """An output wav path that can be written and does not overwrite the input (a usage error unless the
    folder is not writable)."""
    if path.suffix.lower() != ".wav":
        raise UsageError(f"output {path} must end in .wav")
    if path.is_dir():
        raise UsageError(f"output {path} is a folder; give a file name ending in .wav")
    if path.exists() and source.exists() and path.resolve() == source.resolve():
        raise UsageError(f"output {path} is the input file; give another name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"output {path}: {parent} is a file, not a folder")
    if parent is not None and not os.access(parent, os.W_OK):
        raise EsnError(f"output {path}: folder {parent} is not writable")


def cmd_convert(args: argparse.Namespace) -> int:
    """``esn convert``: one speech file to a target emotion, optionally steered by a mask."""
    from esn.adapters import EVCRequest, GenerationConfig
    from esn.audio import prepare_audio, write_audio
    from esn.emotions import EMOTIONS, normalize_emotion
    from esn.interventions import resolve

    # Everything a user can get wrong is checked before the (slow) model load.
    cls = check_model_args(args)
    check_output(args.output, args.input)
    with command_line():
        emotion = normalize_emotion(args.emotion, EMOTIONS)
        try:
            config = GenerationConfig(seed=args.seed, speaker=args.speaker, system_prompt=args.system_prompt,
                                      max_new_tokens=args.max_new_tokens, max_audio_tokens=args.max_audio_tokens)
        except ValueError as exc:
            raise EsnError(f"bad generation setting: {exc}") from None
        if args.mask is not None:
            method, alpha = resolve(args.method or "steer", args.alpha)
            mask_emotion = normalize_emotion(args.mask_emotion or emotion, EMOTIONS)
        elif args.mask_emotion is not None or args.alpha is not None or args.method is not None:
            raise EsnError("--method, --alpha and --mask-emotion need --mask")
    audio = prepare_audio(args.input)
    mask = None
    if args.mask is not None:
        from esn.artifacts import load_masks

        mask = load_masks(args.mask)[mask_emotion]
    request = EVCRequest(audio=audio, emotion=emotion, id=args.input.stem)
    adapter = load_adapter(args, cls)
    with contextlib.ExitStack() as stack:
        if mask is not None:
            from esn.steering import steer

            # Checks the mask's layout against this model's before anything is generated.
            stack.enter_context(steer(adapter, mask, method, alpha))
        with status(f"converting {args.input.name} to {emotion}"):
            (result,) = adapter.generate([request], config)
    if result.waveform.size == 0:
        raise EsnError(f"{args.adapter} produced no speech for {args.input} (decoded text: {result.text!r})")
    write_audio(args.output, result.waveform, result.sample_rate)
    seconds = result.waveform.size / result.sample_rate
    if args.json:
        print(json.dumps({"input": str(args.input), "output": str(args.output), "emotion": emotion,
                          "text": result.text, "seconds": round(seconds, 6), "sample_rate": result.sample_rate,
                          "mask": None if mask is None else str(args.mask),
                          "mask_emotion": None if mask is None else mask_emotion,
                          "method": None if mask is None else method, "alpha": None if mask is None else alpha},
                         indent=2))  # ASCII: the model's text cannot reach the terminal as control codes
        return 0
    console.print(printable(result.text), highlight=False, markup=False)  # model text: no control characters
    note(f"wrote {args.output} ({seconds:.2f} s at {result.sample_rate} Hz)")
    return 0
