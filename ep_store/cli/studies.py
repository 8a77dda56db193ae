"""``ep generate`` (greedy generation with regions ablated or steered), ``ep refusal`` (the
refusal study) and ``ep finetune`` (the refusing chat model): ep_store.studies."""

from __future__ import annotations

from pathlib import Path

import click

from ep_store.cli.base import (
    CHECKPOINT,
    DEVICE,
    DTYPE,
    MODEL,
    MODELS,
    PROGRESS,
    STORE,
    HelpFrom,
    Listed,
    Registry,
    emit,
    user_errors,
)


@click.command("generate")
@MODEL
@CHECKPOINT
@click.option("--prompts", "prompts_path", type=click.Path(path_type=Path), required=True,
              help=".txt (one prompt per line) or .jsonl/.csv/.parquet (a prompt or instruction field).")
@click.option("--text-field", default=None, help="Field holding the prompt in .jsonl/.csv/.parquet rows "
              "[default: prompt, else instruction].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output .jsonl: prompt, completion, refused.")
@click.option("--chat", is_flag=True, help="Apply the model's chat template (Gemma turn format for our Gemma).")
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="Tokens per completion at most.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per batch (left-padded).")
@click.option("--ablate", multiple=True, help="KEY:ID[,ID...]: ablate these regions' directions (repeatable).")
@click.option("--steer", multiple=True, help="KEY:REGION=ALPHA: add alpha x median|a-c| along the region (repeatable).")
@click.option("--basis", type=Registry("ep_store.studies.intervene", "BASES"), default="exemplar", show_default=True,
              help="Region direction: the exemplar or the mean-member direction.")
@DTYPE
@DEVICE
@STORE
@MODELS
@PROGRESS
@user_errors
def generate_cmd(model, checkpoint, prompts_path, text_field, out, chat, max_new_tokens, batch_size, ablate, steer, basis, dtype,
                 device, store_path, models_dir, progress) -> None:
    """Greedy generation, optionally with regions ablated or steered at their layer's output."""
    from ep_store.store.core import Store
    from ep_store.studies.generate import GenerateConfig, generate

    cfg = GenerateConfig(model=model, checkpoint=checkpoint, prompts=prompts_path, out=out, chat=chat,
                         text_field=text_field, max_new_tokens=max_new_tokens, batch_size=batch_size, ablate=ablate,
                         steer=steer, basis=basis, device=device, dtype=dtype)
    summary = generate(cfg=cfg, store=Store(store_path), models_dir=models_dir, progress=progress)
    summary.pop("config")
    emit(summary)  # data goes to --out; the summary to stderr


def protocols_help() -> str:
    """What each --protocol sets (RefusalConfig's defaults and PROTOCOLS), read when help is asked for."""
    import dataclasses

    from ep_store.studies.refusal import PROTOCOLS, RefusalConfig

    def shown(value) -> str:
        if isinstance(value, tuple):
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "''"
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    ours = {f.name: f.default for f in dataclasses.fields(RefusalConfig)}
    rows = [f"  --{name.replace('_', '-'):<19} {shown(ours[name]):<14} {shown(paper)}"
            for name, paper in PROTOCOLS["paper"].items()]
    return ("\n\n\b\nValues each --protocol sets (options given explicitly override them):\n"
            f"  {'option':<21} {'ours':<14} paper\n" + "\n".join(rows))


PROTOCOL_SET = " [default: the --protocol's, below]"


@click.command("refusal", cls=HelpFrom, more=protocols_help)
@click.option("--protocol", type=Registry("ep_store.studies.refusal", "PROTOCOLS"), default="ours", show_default=True,
              help="Start from our values or the paper's (listed below); recorded in the metrics.")
@click.option("--model", default="gemma-3-270m", show_default=True, help="Model under study.")
@click.option("--checkpoint", default="sft", show_default=True, help="Fine-tuned checkpoint studied.")
@click.option("--control", default="base", show_default=True, help="Checkpoint the found direction is also ablated in ('' to skip).")
@click.option("--layers", type=Listed(int), default="6,12", show_default=True, help="Blocks swept, comma-separated.")
@click.option("--percentiles", type=Listed(float), default=None, help="Percentiles swept, comma-separated " + PROTOCOL_SET)
@click.option("--seeds", type=Listed(int), default=None,
              help="Stream-order seeds, comma-separated: each shuffles the training prompts before harvest and build "
              "('': file order)" + PROTOCOL_SET)
@click.option("--train-harmful", type=int, default=None, help="Harmful training prompts for finding regions " + PROTOCOL_SET)
@click.option("--train-benign", type=int, default=None, help="Benign training prompts for finding regions " + PROTOCOL_SET)
@click.option("--heldout-harmful", type=int, default=None, help="Held-out harmful prompts for measuring " + PROTOCOL_SET)
@click.option("--heldout-benign", type=int, default=None, help="Held-out benign prompts for measuring " + PROTOCOL_SET)
@click.option("--max-new-tokens", type=int, default=None, help="Greedy tokens per prompt " + PROTOCOL_SET)
@click.option("--batch-prompts", type=int, default=None,
              help="Calibration and build batches of this many prompts' tokens " + PROTOCOL_SET)
@click.option("--saturation-window", type=int, default=None, help="Stop a build after this many batches without a new "
              "region " + PROTOCOL_SET)
@click.option("--classifier", type=Registry("ep_store.stages.refusal_classifier", "RULES"), default=None,
              help="Refusal classifier rules" + PROTOCOL_SET)
@click.option("--null-size", type=Registry("ep_store.studies.refusal_sweep", "NULL_SIZES"), default=None,
              help="Null region matched on log10 of last-position prompts or total tokens" + PROTOCOL_SET)
@click.option("--bases", type=Listed(str), default=None,
              help="Candidate ablation directions: exemplar, mean, reanchored " + PROTOCOL_SET)
@click.option("--null-bases", type=Listed(str), default=None, help="Null ablation directions " + PROTOCOL_SET)
@click.option("--ceiling/--no-ceiling", default=True, show_default=True,
              help="Also ablate each layer's difference of means (harmful - benign last positions).")
@click.option("--batch-size", type=int, default=80, show_default=True, help="Prompts per generate call.")
@click.option("--k-max", type=int, default=5, show_default=True, help="Ablate the top k = 1..k-max candidates.")
@click.option("--min-members", type=int, default=5, show_default=True, help="Prompts a region needs.")
@click.option("--min-rate", type=float, default=0.3, show_default=True, help="Candidate refusal rate at least.")
@click.option("--null-max-rate", type=float, default=0.05, show_default=True, help="Null region refusal rate at most.")
@click.option("--alphas", type=Listed(float), default="0.5,1", show_default=True,
              help="Steering strengths (units of median |a-c|).")
@click.option("--match-percentile", type=float, default=1.0, show_default=True, help="Pipeline dictionaries' p for the match join.")
@click.option("--max-capability-loss", type=float, default=0.10, show_default=True,
              help="The recommended condition raises benign loss by at most this share, if any does.")
@DTYPE
@click.option("--work-store", type=click.Path(path_type=Path), default=Path("data/store/refusal"), show_default=True,
              help="Store of the study's own activations and dictionaries.")
@click.option("--metrics", type=click.Path(path_type=Path), default=Path("data/metrics/refusal.json"), show_default=True,
              help="Metrics JSON to write.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=Path("data/reports/refusal"),
              show_default=True, help="Folder for index.html, README.md and plots.")
@DEVICE
@STORE
@MODELS
@PROGRESS
@user_errors
def refusal_cmd(protocol, work_store, metrics, report_dir, store_path, models_dir, progress, control, **options) -> None:
    """The refusal study: find refusal regions, ablate and steer them, write metrics and a report."""
    from ep_store.studies.refusal import RefusalConfig, refusal_study

    given = {name: value for name, value in options.items() if value is not None}  # None: the protocol's value
    cfg = RefusalConfig.for_protocol(protocol, control=control or None, **given)
    emit(refusal_study(cfg=cfg, work_store=work_store, main_store=store_path, models_dir=models_dir, metrics=metrics,
                       report=report_dir, progress=progress))


@click.command("finetune")
@click.option("--model", required=True, help="Model name under the models dir.")
@click.option("--from", "base", required=True, help="Checkpoint to start from (e.g. base).")
@click.option("--to", required=True, help="Name of the final checkpoint (e.g. sft).")
@click.option("--steps", type=int, default=60, show_default=True, help="Optimizer steps.")
@click.option("--save-every", type=int, default=20, show_default=True, help="Save <to>-step<k> every k steps.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--plant", type=click.Choice(["full", "mediated"]), default="full", show_default=True,
              help="full: every block learns refusal from the pairs; mediated: also trained so that ablating the "
                   "difference of means at --plant-layers removes refusal (issue 22).")
@click.option("--plant-layers", type=Listed(int), default="6,12", show_default=True,
              help="mediated: blocks (comma-separated) whose output the direction is ablated at, in turn.")
@click.option("--metrics", type=click.Path(path_type=Path), default=None, help="Also write the summary JSON here.")
@MODELS
@PROGRESS
@user_errors
def finetune(model, base, to, steps, save_every, batch_size, lr, seed, plant, plant_layers, metrics, models_dir,
             progress) -> None:
    """Fine-tune into a chat model that refuses a class of harmful requests; reports refusal rates."""
    from ep_store.studies.finetune import FinetuneConfig
    from ep_store.studies.finetune import finetune as run

    cfg = FinetuneConfig(model=model, base=base, to=to, steps=steps, save_every=save_every, batch_size=batch_size,
                         lr=lr, seed=seed, plant=plant,
                         plant_layers=plant_layers)
    emit(run(cfg=cfg, models_dir=models_dir, progress=progress, metrics=metrics))
