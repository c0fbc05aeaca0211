"""The same gate interventions, written inside an nnsight trace (for researchers who compose their own).

The fast path (``esn.steering``) never imports nnsight; this module is the opt-in bridge
(``pip install --find-links dist 'esn-core[nnsight]'``, docs/install.md). It applies exactly the edits of ``steer``/``steer_rows`` (the same
dense tensors and kernels), so the results are bit-identical to the hook path. Recipe::

    from nnsight import NNsight
    from esn.nnsight_support import TraceSteering

    traced = NNsight(target.model)                 # adapter.model or ModelTarget.model
    plan = TraceSteering(target, mask, "steer", 1.0)  # tensors built once
    with traced.trace(**inputs, fn=target.model.generate, max_new_tokens=N) as tracer:
        for step in tracer.iter[:N]:               # step 0 = prefill; tracer.iter[1:N] = generated only
            plan.apply(traced)                     # sets each touched act_fn output [batch, pos, d_mlp]
        tokens = tracer.result.save()

Statements after an open ``tracer.all()`` loop do not run in nnsight 0.8, so bound the loop to the
number of forwards (``max_new_tokens``; pass ``min_new_tokens`` too if rows may stop early).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esn.errors import EsnError
from esn.hookpoints import HookPoint, Layout
from esn.interventions import Method, resolve
from esn.masks import Mask
from esn.plugins import Registry
from esn.steering import Condition, _build, _Edit, _Row, check_mask


def envoy(target: Any, traced: Any, hook_point: HookPoint | str) -> Any:
    """The envoy of a hook point's ``act_fn`` in ``traced`` (an ``nnsight.NNsight`` of ``target.model``).

    Uses the adapter's own ``envoy`` when it has one; for a ``ModelTarget`` walks the module path the
    same way (``layers.3`` -> ``layers[3]``).
    """
    if hasattr(target, "envoy"):
        return target.envoy(traced, hook_point)
    hp = target.layout()[hook_point] if isinstance(hook_point, str) else hook_point
    node = traced
    for part in hp.module.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


class TraceSteering:
    """Edits for one mask (or one condition per row), ready to apply inside any number of traces/steps.

    ``TraceSteering(target, mask, method, alpha)`` edits every row; ``TraceSteering.rows(target,
    conditions)`` gives row ``b`` ``conditions[b]``. ``apply(traced)`` must be called inside a trace,
    once per forward (per ``tracer.iter`` step); it touches hook points in layer order, which is the
    execution order nnsight requires.
    """

    def __init__(self, target: Any, mask: Mask | None = None, method: Method = "steer",
                 alpha: float | None = None, *, registry: Registry | None = None,
                 _edits: tuple[Layout, dict[str, _Edit]] | None = None):
        self.target = target
        if _edits is None:
            cls, alpha = resolve(method, alpha, registry)
            layout = check_mask(target, mask)
            _edits = layout, _build(target, layout, [_Row(None, cls, alpha, cls.affine(alpha), mask.split())], None)
        self.layout, self.edits = _edits
        routed = [n for n in self.edits if self.layout[n].routed or self.layout[n].flat]
        if routed:  # their rows need the routing (esn.routing), which the envoy path does not see
            raise EsnError(f"nnsight steering supports dense [batch, pos, d] gates only; {routed[0]} is a "
                           "mixture-of-experts gate: use esn.steering.steer / steer_rows")
        other = [n for n in self.edits if self.layout[n].kind in ("fused", "indexed")]
        if other:  # a fused gate has no module of its own in the traced model; an indexed one needs its index
            raise EsnError(f"nnsight steering supports dense [batch, pos, d] gates only; {other[0]} is a "
                           f"{self.layout[other[0]].kind} gate: use esn.steering.steer / steer_rows")

    @classmethod
    def rows(cls, target: Any, conditions: Sequence[Condition | None], *,
             registry: Registry | None = None) -> TraceSteering:
        """Row ``b`` of every traced batch gets ``conditions[b]`` (``None``: nothing)."""
        from esn.steering import _row_items

        items = _row_items(target, conditions, registry)
        layout = target.layout()
        return cls(target, _edits=(layout, _build(target, layout, items, len(conditions)) if items else {}))

    @property
    def hook_points(self) -> tuple[str, ...]:
        """Names of the hook points this steering edits, in layer order."""
        return tuple(self.edits)

    def apply(self, traced: Any) -> None:
        """Inside a trace: replace each touched gate ``[batch, pos, d_mlp]`` by its edited value."""
        for name, edit in self.edits.items():
            node = envoy(self.target, traced, self.layout[name])
            node.output = edit(node.output)


def apply_in_trace(target: Any, traced: Any, mask: Mask, method: Method = "steer", alpha: float | None = None,
                   *, registry: Registry | None = None) -> TraceSteering:
    """One-shot form of ``TraceSteering(target, mask, method, alpha).apply(traced)``; returns the plan.

    Builds the edit tensors on every call: inside a ``tracer.iter`` loop, build a ``TraceSteering``
    once before the trace and call its ``apply`` instead.
    """
    plan = TraceSteering(target, mask, method, alpha, registry=registry)
    plan.apply(traced)
    return plan
