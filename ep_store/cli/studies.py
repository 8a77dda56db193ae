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


@click.command("refusal")
@click.option("--model", default="gemma-3-270m", show_default=True, help="Model under study.")
@click.option("--checkpoint", default="sft", show_default=True, help="Fine-tuned checkpoint studied.")
@click.option("--control", default="base", show_default=True, help="Checkpoint the found direction is also ablated in ('' to skip).")
@click.option("--layers", type=Listed(int), default="6,12", show_default=True, help="Blocks swept, comma-separated.")
@click.option("--percentiles", type=Listed(float), default="4", show_default=True, help="Percentiles swept, comma-separated.")
@click.option("--train-harmful", type=int, default=60, show_default=True, help="Harmful training prompts for finding regions.")
@click.option("--train-benign", type=int, default=60, show_default=True, help="Benign training prompts for finding regions.")
@click.option("--heldout-harmful", type=int, default=30, show_default=True, help="Held-out harmful prompts for measuring.")
@click.option("--heldout-benign", type=int, default=30, show_default=True, help="Held-out benign prompts for measuring.")
@click.option("--max-new-tokens", type=int, default=8, show_default=True, help="Greedy tokens per prompt.")
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
def refusal_cmd(model, checkpoint, control, layers, percentiles, train_harmful, train_benign, heldout_harmful,
                heldout_benign, max_new_tokens, batch_size, k_max, min_members, min_rate, null_max_rate, alphas,
                match_percentile, max_capability_loss, dtype, work_store, metrics, report_dir, device, store_path, models_dir,
                progress) -> None:
    """The refusal study: find refusal regions, ablate and steer them, write metrics and a report."""
    from ep_store.studies.refusal import RefusalConfig, refusal_study

    cfg = RefusalConfig(model=model, checkpoint=checkpoint, control=control or None, layers=layers,
                        percentiles=percentiles, train_harmful=train_harmful, train_benign=train_benign,
                        heldout_harmful=heldout_harmful, heldout_benign=heldout_benign, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, k_max=k_max, min_members=min_members, min_rate=min_rate,
                        null_max_rate=null_max_rate, alphas=alphas, max_capability_loss=max_capability_loss,
                        match_percentile=match_percentile, device=device, dtype=dtype)
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
@click.option("--metrics", type=click.Path(path_type=Path), default=None, help="Also write the summary JSON here.")
@MODELS
@PROGRESS
@user_errors
def finetune(model, base, to, steps, save_every, batch_size, lr, seed, metrics, models_dir, progress) -> None:
    """Fine-tune into a chat model that refuses a class of harmful requests; reports refusal rates."""
    from ep_store.studies.finetune import FinetuneConfig
    from ep_store.studies.finetune import finetune as run

    cfg = FinetuneConfig(model=model, base=base, to=to, steps=steps, save_every=save_every, batch_size=batch_size,
                         lr=lr, seed=seed)
    emit(run(cfg=cfg, models_dir=models_dir, progress=progress, metrics=metrics))
