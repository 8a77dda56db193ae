"""``ep eval``: the field's evaluation protocols on dictionaries (ep_store.evaluate): SAEBench sparse
probes, AxBench concept detection, nearest-exemplar distance as an OOD score. ``--protocol paper``
runs SAEBench / AxBench as published (ep_store.evaluate.protocols), beside ours (the default)."""

from __future__ import annotations

from pathlib import Path

import click

from ep_store.cli.base import DEVICE, MODELS, PROGRESS, STORE, Listed, Registry, emit, user_errors
from ep_store.evaluate.tasks import BUILTIN_TASKS


@click.group("eval")
def eval_group() -> None:
    """Evaluate dictionaries with the field's protocols: sparse probes, concept detection, OOD."""


EVAL_DICTS = click.option("--dictionary", "dictionaries", type=Listed(str), multiple=True, required=True,
                          help="<model>/<checkpoint>/L<layer>/p<p>, or <model>/<checkpoint>/all; repeat (or comma-separate) "
                               "for several of one model: one forward.")
EVAL_RUN = [
    click.option("--model", default=None, help="Run the texts through this model (default: the dictionaries').",),
    click.option("--checkpoint", default=None, help="Run the texts through this checkpoint (default: the dictionaries')."),
    click.option("--max-tokens-per-text", type=int, default=None,
                 help="First tokens kept per text [default: 64; 128 with --protocol paper]."),
    click.option("--batch-size", type=int, default=16, show_default=True, help="Texts per forward pass."),
    click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for metrics.json and plots."),
    click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), default=None,
                 help="Also write the headline metrics here (for dvc metrics show)."),
    click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
                 help="Also copy the PNG plots, alone, into this folder (for dvc plots show)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits."),
    DEVICE, STORE, MODELS, PROGRESS,
]


PROTOCOL = click.option("--protocol", type=Registry("ep_store.evaluate.protocols", "PROTOCOLS"), default="ours",
                        show_default=True, help="ours, or paper: the benchmark as published (SAEBench / AxBench); "
                                                "recorded in every metrics file.")


def eval_options(fn):
    for option in reversed(EVAL_RUN):
        fn = option(fn)
    return EVAL_DICTS(fn)


def _evaluate(run_eval, cfg, store_path, models_dir, max_tokens_per_text, batch_size, device, progress, out,
              metrics_path, plots_dir, default_tokens: int = 64) -> None:
    """Run one protocol's ``run_eval`` over texts run through the model (TextRun) and emit its
    summary; ``max_tokens_per_text`` None means ``default_tokens`` (the protocol's)."""
    from ep_store.evaluate.features import TextRun
    from ep_store.store.core import Store

    if max_tokens_per_text is None:
        max_tokens_per_text = default_tokens
    run = TextRun(models_dir=models_dir, max_tokens_per_text=max_tokens_per_text, batch_size=batch_size, device=device,
                  progress=progress)
    emit(run_eval(cfg=cfg, store=Store(store_path), run=run, out=out, metrics_path=metrics_path, plots_dir=plots_dir))


@eval_group.command("probe")
@click.option("--data", default="builtin", show_default=True,
              help=f"builtin, built-in task names ({','.join(BUILTIN_TASKS)}) or a .jsonl/.csv/.parquet file.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text.")
@click.option("--label-field", default="label", show_default=True, help="Field holding the class label.")
@click.option("--ks", type=Listed(str), default="1,2,5,20,all", show_default=True,
              help="Feature counts k of the sparse probes.")
@PROTOCOL
@eval_options
@user_errors
def eval_probe(dictionaries, data, text_field, label_field, ks, protocol, model, checkpoint, seed, **run) -> None:
    """SAEBench sparse probing: raw residual vs EP one-hot vs EP signed projection, per task and k."""
    from ep_store.evaluate.probe import ProbeConfig, ProbeEvalConfig, run_probe_eval
    from ep_store.evaluate.protocols import PROBE

    cfg = ProbeEvalConfig(dictionaries=sum(dictionaries, ()), data=data, text_field=text_field,
                          label_field=label_field, model=model, checkpoint=checkpoint,
                          probe=ProbeConfig(ks=ks, seed=seed, protocol=protocol))
    _evaluate(run_probe_eval, cfg, **run, default_tokens=PROBE[protocol].max_tokens_per_text)


@eval_group.command("concepts")
@click.option("--data", default="builtin", show_default=True,
              help="builtin, or a .jsonl/.csv/.parquet file with concept/text/label "
                   "(or AxBench's output_concept/output/category).")
@click.option("--test-fraction", type=float, default=0.5, show_default=True, help="Held-out share per concept.")
@PROTOCOL
@click.option("--chat", type=Registry("ep_store.evaluate.protocols", "CHAT_ROLES"), default=None,
              help="Frame each text as this turn of the model's chat template, template prefix left out of "
                   "the scores [default: none; model with --protocol paper].")
@eval_options
@user_errors
def eval_concepts(dictionaries, data, test_fraction, protocol, chat, model, checkpoint, seed, **run) -> None:
    """AxBench latent concept detection: AUROC of the best region vs difference of means."""
    from ep_store.evaluate.concepts import ConceptConfig, ConceptEvalConfig, run_concept_eval
    from ep_store.evaluate.protocols import CONCEPT

    cfg = ConceptEvalConfig(dictionaries=sum(dictionaries, ()), data=data, model=model, checkpoint=checkpoint,
                            concepts=ConceptConfig(test_fraction=test_fraction, seed=seed, protocol=protocol,
                                                   chat=chat))
    _evaluate(run_concept_eval, cfg, **run, default_tokens=CONCEPT[protocol].max_tokens_per_text)


@eval_group.command("ood")
@click.option("--in-corpus", default="builtin", show_default=True,
              help="In-distribution corpus (as ep harvest --corpus); its last documents are used.")
@click.option("--ood-corpus", type=Listed(str), default="",
              help="Extra OOD sets: .txt/.jsonl/.csv/.parquet files, comma-separated "
                   "(held-out, word-shuffled and random-token sets are always made).")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in .jsonl/.csv/.parquet rows of the OOD and in-corpus files.")
@click.option("--documents", type=int, default=40, show_default=True, help="Documents per set.")
@eval_options
@user_errors
def eval_ood(dictionaries, in_corpus, ood_corpus, text_field, documents, model, checkpoint, seed, **run) -> None:
    """Nearest-exemplar distance as an OOD score: within-theta rate, quantiles, AUROC per set."""
    from ep_store.evaluate.ood import OODConfig, run_ood_eval

    cfg = OODConfig(dictionaries=sum(dictionaries, ()), in_corpus=in_corpus, ood_corpus=ood_corpus,
                    text_field=text_field, documents=documents, seed=seed, model=model, checkpoint=checkpoint)
    _evaluate(run_ood_eval, cfg, **run)
