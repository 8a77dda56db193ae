"""Where each hook point lives inside a decoder block (issue 21, item 4).

TransformerLens names five points of the residual stream around block ``L``; ep_store reads
them from a ``transformers`` model with one PyTorch hook each:

    resid_pre   the block's input                       forward pre-hook on the block
    resid_mid   the stream between attention and MLP    input of the norm before the MLP
    attn_out    what attention adds to the stream       output of the attention sublayer
    mlp_out     what the MLP adds to the stream         output of the MLP sublayer
    resid_post  the block's output (the default)        forward hook on the block

"What a sublayer adds" is the tensor the block adds to the residual: in Gemma 2/3 (sandwich
norms) that is the output of ``post_attention_layernorm`` / ``post_feedforward_layernorm``;
in Llama, Qwen, Mistral and GPT-2 the attention and MLP outputs themselves. Blocks with a
parallel residual (GPT-NeoX/Pythia, Phi) have no ``resid_mid``: asking for it is refused
rather than silently reading the block input.

    handle = attach(block, "attn_out", keep)   # keep(x_BTD) is called on every forward
    handle = rewrite(block, "attn_out", edit)  # the block goes on with edit(x_BTD) (interventions)
    handle.remove()
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ep_store.errors import UsageError
from ep_store.keys import HOOKS

PRE_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
"""The norm in front of the MLP, by family: Gemma 2/3 first (their ``post_attention_layernorm``
normalises the attention output), then Llama/Qwen/Mistral, then GPT-2."""
ATTENTION = ("self_attn", "attn", "attention")
MLP = ("mlp", "feed_forward")
SANDWICH = {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"}
"""In blocks with sandwich norms (a ``pre_feedforward_layernorm``), the output norm of each sublayer."""


def _first(block: torch.nn.Module, names: tuple[str, ...], hook: str) -> torch.nn.Module:
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UsageError(f"cannot find where {hook} lives in {type(block).__name__} (looked for {', '.join(names)}); "
                     f"harvest this architecture at resid_pre or resid_post")


def _parallel(block: torch.nn.Module) -> bool:
    return bool(getattr(block, "use_parallel_residual", False)) or (
        getattr(block, "post_attention_layernorm", None) is None and getattr(block, "ln_2", None) is None
        and getattr(block, "pre_feedforward_layernorm", None) is None)


def site(block: torch.nn.Module, hook: str) -> tuple[torch.nn.Module, str]:
    """(module, "input" | "output"): the module whose input or output is hook point ``hook`` of
    ``block``. UsageError for an unknown hook point or one this block layout does not have."""
    if hook not in HOOKS:
        raise UsageError(f"unknown hook point {hook!r}; pass one of {', '.join(HOOKS)}")
    if hook == "resid_post":
        return block, "output"
    if hook == "resid_pre":
        return block, "input"
    sandwich = getattr(block, "pre_feedforward_layernorm", None) is not None
    if hook == "resid_mid":
        if _parallel(block):
            raise UsageError(f"{type(block).__name__} runs attention and MLP in parallel: it has no resid_mid; "
                             "pick resid_pre, attn_out, mlp_out or resid_post")
        return _first(block, PRE_MLP_NORMS, hook), "input"
    if sandwich:
        return _first(block, (SANDWICH[hook],), hook), "output"
    return _first(block, ATTENTION if hook == "attn_out" else MLP, hook), "output"


def attach(block: torch.nn.Module, hook: str, keep: Callable[[torch.Tensor], None]):
    """Call ``keep(x_BTD)`` with hook point ``hook`` of ``block`` on every forward; returns the
    handle (``.remove()`` takes the hook off). ``keep`` may raise to end the forward pass."""
    module, side = site(block, hook)
    if side == "output":
        def on_output(_module, _args, output):
            keep(output[0] if isinstance(output, tuple) else output)

        return module.register_forward_hook(on_output)

    def on_input(_module, args, kwargs):
        keep(args[0] if args else kwargs["hidden_states"])

    return module.register_forward_pre_hook(on_input, with_kwargs=True)


def rewrite(block: torch.nn.Module, hook: str, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Replace hook point ``hook`` of ``block`` by ``edit(x_BTD)`` on every forward (an
    intervention at the point a dictionary was harvested at); returns the handle. UsageError for
    ``resid_mid``: it is the input of a norm, so editing it would change only what the MLP
    reads, not the stream."""
    if hook == "resid_mid":
        raise UsageError("an edit at resid_mid would change only the MLP's input, not the residual stream; "
                         "intervene with a dictionary of resid_pre, attn_out, mlp_out or resid_post")
    module, side = site(block, hook)
    if side == "output":
        def on_output(_module, _args, output):
            return (edit(output[0]), *output[1:]) if isinstance(output, tuple) else edit(output)

        return module.register_forward_hook(on_output)

    def on_input(_module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(on_input, with_kwargs=True)
