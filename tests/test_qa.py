"""Unhappy paths found by trying the ``ep`` command as a new user would (QA pass): each is
refused with exit code 2 and one line, before any work and without writing anything."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from tests.conftest import tree_snapshot
from tests.test_cli_errors import assert_refused


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def built_store(tmp_path_factory, tiny_store):
    """A copy of the tiny store with tiny/base/L1/p10 built."""
    import shutil

    dst = tmp_path_factory.mktemp("qa") / "store"
    shutil.copytree(tiny_store, dst)
    result = run_cli(["build", "--model", "tiny", "--checkpoint", "base", "--layer", "1", "--percentile", "10",
                      "--calibration-tokens", "400", "--calibration-batch", "100", "--batch-size", "256",
                      "--device", "cpu", "--no-progress", "--store", dst])
    assert result.exit_code == 0, result.output
    return dst


def output_cases(tmp_path, store, models_dir):
    """(args, needle) of every command whose output path is an existing file, under a file or a folder."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello 😀\n")
    key = "tiny/base/L1/p10"
    st = ["--store", store]
    gen = ["generate", "--model", "tiny", "--checkpoint", "base", "--prompts", prompts, "--max-new-tokens", "2",
           "--device", "cpu", "--no-progress", "--models-dir", models_dir, *st]
    ev = ["eval", "ood", "--dictionary", key, "--documents", "2", "--max-tokens-per-text", "4", "--device", "cpu",
          "--no-progress", "--models-dir", models_dir, *st]
    return [
        (["report", "dictionary", key, "--out", a_file, *st], "is a file"),
        (["report", "dictionary", key, "--out", a_file / "sub", *st], "is a file, not a folder"),
        (["diff", key, key, "--out", a_file / "sub", *st], "is a file, not a folder"),
        ([*gen, "--out", a_file / "g.jsonl"], "is a file, not a folder"),
        ([*gen, "--out", a_dir], "is a folder"),
        (["sql", "SELECT 1", "--output", a_file / "x.csv", *st], "is a file, not a folder"),
        (["stats", key, "top_tokens", "--output", a_file / "x.parquet", *st], "is a file, not a folder"),
        (["store", "digest", prompts, "--metrics", a_file / "m.json"], "is a file, not a folder"),
        ([*ev, "--out", a_file / "sub"], "--out"),
        ([*ev, "--out", tmp_path / "ev", "--metrics", a_file / "m.json"], "--metrics"),
        ([*ev, "--out", tmp_path / "ev", "--metrics", a_dir], "--metrics"),
        ([*ev, "--out", tmp_path / "ev", "--plots", a_file], "--plots"),
    ]


def test_unwritable_output_paths_are_refused_before_work(built_store, models_dir, tmp_path):
    """Found: `ep report dictionary KEY --out FILE` (and diff, generate, eval --metrics, sql --output, ...)
    crashed with a traceback, some only after all the work; now exit 2, one line, nothing written."""
    for args, needle in output_cases(tmp_path, built_store, models_dir):
        before_store, before_tmp = tree_snapshot(built_store), tree_snapshot(tmp_path)
        assert_refused(run_cli(args), needle)
        assert tree_snapshot(built_store) == before_store, args
        assert tree_snapshot(tmp_path) == before_tmp, args


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["stats", "tiny/base/L1/p10", "top_tokens", "--top", "-5"], "--top must lie in [1,"),
        (["stats", "tiny/base/L1/p10", "top_contexts", "--limit", "0"], "--limit must lie in [1,"),
        (["stats", "tiny/base/L1/p10", "top_contexts", "--context", "9223372036854775807"], "--context must lie in [0,"),
        (["stats", "tiny/base/L1/p10", "transitions", "--against", "tiny/base/L1/p10", "--limit", "-1"],
         "--limit must lie"),
        (["report", "dictionary", "tiny/base/L1/p10", "--out", "{tmp}/rep", "--per-region", "0"], "--per-region"),
        (["report", "dictionary", "tiny/base/L1/p10", "--out", "{tmp}/rep", "--context", "-3"], "--context"),
        (["diff", "tiny/base/L1/p10", "tiny/base/L1/p10", "--out", "{tmp}/diff", "--top", "-1"], "--top"),
    ],
)
def test_question_options_out_of_range_are_refused(built_store, tmp_path, args, needle):
    """Found: `ep stats KEY top_tokens --top -5` printed an empty table with exit 0, and
    `--context 9223372036854775807` surfaced DuckDB's INT64 overflow; report/diff made their
    folder before failing. Now every question option is range-checked first."""
    before = tree_snapshot(built_store)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_refused(run_cli([*args, "--store", built_store]), needle)
    assert tree_snapshot(built_store) == before
    assert not (tmp_path / "rep").exists() and not (tmp_path / "diff").exists()


def test_generate_refuses_lengths_beyond_the_position_table(built_store, models_dir, tmp_path):
    """Found: `ep generate ... --max-new-tokens 999999999999` ran past the tiny model's 512
    positions for hours; now exit 2 naming the largest value that fits (prompt + new <= 512)."""
    from transformers import AutoTokenizer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello 😀 你好 <bos> world\nshort\n")
    from ep_store.studies.generate import prompt_ids

    tok = AutoTokenizer.from_pretrained(models_dir / "tiny" / "base")
    longest = len(prompt_ids(tok, ["Hello 😀 你好 <bos> world"], chat=False)[0])  # <bos> typed: text
    base = ["generate", "--model", "tiny", "--checkpoint", "base", "--prompts", prompts, "--out", tmp_path / "g.jsonl",
            "--device", "cpu", "--no-progress", "--models-dir", models_dir, "--store", built_store]
    for n in (str(512 - longest + 1), "999999999999"):  # the small one first: before the fix it ran, not hung
        assert_refused(run_cli([*base, "--max-new-tokens", n]), f"at most --max-new-tokens {512 - longest}")
    assert not (tmp_path / "g.jsonl").exists()
    assert run_cli([*base, "--max-new-tokens", "2"]).exit_code == 0


@pytest.mark.parametrize("alpha", ["1e308", "-1e300", "1e39"])
def test_steering_beyond_float32_is_refused(built_store, models_dir, tmp_path, alpha):
    """Found: `--steer KEY:1=1e308` passed (alpha is finite) and ran the model on inf
    activations; alpha x scale must fit float32."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")
    result = run_cli(["generate", "--model", "tiny", "--checkpoint", "base", "--prompts", prompts,
                      "--out", tmp_path / "g.jsonl", "--max-new-tokens", "2", "--device", "cpu", "--no-progress",
                      "--steer", f"tiny/base/L1/p10:1={alpha}", "--models-dir", models_dir, "--store", built_store])
    assert_refused(result, "beyond float32's range")
    assert not (tmp_path / "g.jsonl").exists()


def test_unreachable_ray_address_is_one_line(store_tmp_copy, models_dir):
    """Found: `ep harvest --engine ray --address ray://127.0.0.1:1 ...` (and `--address auto`
    with no cluster) ended in a Ray traceback; now exit 2, one line naming the address."""
    pytest.importorskip("ray")
    before = tree_snapshot(store_tmp_copy)
    result = run_cli(["harvest", "--engine", "ray", "--address", "ray://127.0.0.1:1", "--workers", "2",
                      "--model", "tiny", "--checkpoint", "base", "--layers", "3", "--max-tokens", "50",
                      "--device", "cpu", "--no-progress", "--models-dir", models_dir, "--store", store_tmp_copy])
    assert_refused(result, "cannot start or reach Ray at --address ray://127.0.0.1:1")
    assert tree_snapshot(store_tmp_copy) == before


@pytest.fixture()
def store_tmp_copy(tiny_store, tmp_path):
    import shutil

    shutil.copytree(tiny_store, tmp_path / "store")
    return tmp_path / "store"


def test_store_ls_is_parseable_tsv(built_store):
    """Found: `ep store ls > f.tsv` wrote tags as a Python dict repr ({'tokens-600': 1});
    each line is now kind, key, rows, width, version and the tags as JSON."""
    import json

    result = CliRunner().invoke(main, ["store", "ls", "--store", str(built_store)], catch_exceptions=False)
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines() if line.startswith(("activations\t", "dictionary\t"))]
    assert any(line.startswith("dictionary\ttiny/base/L1/p10\t") for line in lines), result.stdout
    for line in lines:
        kind, key, rows, width, version, tags = line.split("\t")
        assert int(rows) > 0 and int(width) == 64 and int(version) >= 1
        assert isinstance(json.loads(tags), dict)
    assert "tokens-" in next(line for line in lines if line.startswith("dictionary\t"))


def _as_a_foreground_job():
    """A terminal's foreground job takes SIGINT by default. A background job of a
    non-interactive shell (``pytest ... &``) ignores it, its children inherit that, and
    Python keeps an ignored SIGINT ignored: the Ctrl-C test then waited 120 s on a harvest
    that never saw the signal (3 fresh-clone runs on 2026-12-07, all started in background)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_with_one_line_and_a_rerun_finishes(models_dir, tmp_path):
    """SIGINT (Ctrl-C) mid-harvest: exit code 130 as shells report it, one line, no traceback,
    every committed version readable; the same command then completes the stream."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ep_store.keys import ActivationKey
    from ep_store.store.core import Store

    store = Store(tmp_path / "store")
    args = [sys.executable, "-m", "ep_store", "harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1",
            "--max-tokens", "100000", "--ctx", "32", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--models-dir", str(models_dir), "--store", str(store.root)]
    path = store.activation_path(ActivationKey("tiny", "base", 1))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_as_a_foreground_job)
    deadline = time.time() + 300  # a loaded 2-core machine can take minutes to load torch and the model
    while not (store.exists(path) and store.info(path).rows > 0) and time.time() < deadline:
        time.sleep(0.2)
    if not (store.exists(path) and store.info(path).rows > 0):  # interrupt a harvest, not an import
        proc.kill()
        pytest.fail("the harvest committed no rows in 300 s")
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a harvest running after a failed assertion
    assert proc.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    rows = store.info(path).rows
    assert 0 < rows < 100000 and store.read_table(path, columns=["doc_id"]).num_rows == rows
    finish = [a if a != "100000" else "2000" for a in args]
    done = subprocess.run(finish, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert store.info(path).rows == max(rows, 2000)


def _harvest_args(models_dir, store, *extra):
    return ["harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1", "--max-tokens", "60",
            "--ctx", "32", "--device", "cpu", "--no-progress", "--models-dir", models_dir, "--store", store, *extra]


def test_click_usage_errors_are_one_line(models_dir, tmp_path):
    """Found (QA, 2nd pass): click's own errors (a non-integer option, an unknown option or
    command, a missing option) printed usage, a hint, a blank line and the error; now one line."""
    store = tmp_path / "store"
    cases = [
        (_harvest_args(models_dir, store, "--writer-depth", "abc"), "'abc' is not a valid integer"),
        (_harvest_args(models_dir, store, "--bogus"), "No such option '--bogus'"),
        (_harvest_args(models_dir, store, "--dtype", "int8"), "--dtype"),
        (["models", "list"], "No such command 'list'"),
        (["harvest", "--model", "tiny"], "Missing option"),
    ]
    for args, needle in cases:
        assert_refused(CliRunner().invoke(main, [str(a) for a in args]), needle)
    assert not store.exists()
    assert CliRunner().invoke(main, ["harvest", "--help"]).exit_code == 0


def _chat_file(tmp_path, text):
    import json

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("corpus", "needle"), [
    ("chat:", "chat: needs a file"),
    ("chat:{tmp}", "is a folder"),
    ("chat:{tmp}/nothing.jsonl", "does not exist"),
    ("chat:{chat}", "has no <start_of_turn> / <end_of_turn> token"),  # the tiny tokenizer: not Gemma
    ("{surrogate}", "lone surrogate"),
    ("chat:{surrogate}", "lone surrogate"),
])
def test_bad_corpus_sources_are_one_line(models_dir, tmp_path, corpus, needle):
    """Found (QA): `chat:` with no file said '. does not exist'; a folder said 'does not
    exist'; a Gemma chat file harvested with a tokenizer without turn tokens stored the
    markers as characters without a word; a lone surrogate in JSONL ended in a traceback."""
    import json

    sub = tmp_path / "in"
    sub.mkdir()
    surrogate = sub / "sur.jsonl"
    surrogate.write_text(json.dumps({"text": "bad \ud83d surrogate"}) + "\n", encoding="utf-8")
    chat = _chat_file(sub, "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    corpus = corpus.format(tmp=sub, surrogate=surrogate, chat=chat)
    store = tmp_path / "store"
    assert_refused(CliRunner().invoke(main, [str(a) for a in _harvest_args(models_dir, store, "--corpus", corpus)]),
                   needle)
    assert not any(store.rglob("*.lance")) if store.exists() else True


@pytest.mark.real_model
def test_chat_file_starting_with_bos_is_refused(gemma_models_dir, tmp_path):
    """Found (QA): a chat: document rendered by apply_chat_template starts with '<bos>', which
    was stored as three text tokens on top of the BOS the harvester adds."""
    path = _chat_file(tmp_path, "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    args = ["harvest", "--model", "gemma-3-270m", "--checkpoint", "base", "--layers", "1", "--corpus", f"chat:{path}",
            "--device", "cpu", "--no-progress", "--models-dir", gemma_models_dir, "--store", tmp_path / "store"]
    assert_refused(CliRunner().invoke(main, [str(a) for a in args]), "starts with '<bos>'")


@pytest.mark.parametrize(("content", "needle"), [
    ('{"prompt": ""}\n', "holds no prompts"),  # empty prompts are skipped (issue 18, B5)
    ('{"prompt": "   "}\n', "holds no prompts"),
    ('{"prompt": "bad \\ud83d surrogate"}\n', "lone surrogate"),
    (None, "is a folder"),
])
def test_bad_prompts_are_one_line(built_store, models_dir, tmp_path, content, needle):
    """Found (QA): an empty JSONL prompt crashed in the model (0-element reshape), a lone
    surrogate in the tokenizer; a folder was said not to exist."""
    prompts = tmp_path / "p.jsonl"
    if content is None:
        prompts.mkdir()
    else:
        prompts.write_text(content, encoding="utf-8")
    result = run_cli(["generate", "--model", "tiny", "--checkpoint", "base", "--prompts", prompts,
                      "--out", tmp_path / "g.jsonl", "--max-new-tokens", "2", "--device", "cpu", "--no-progress",
                      "--models-dir", models_dir, "--store", built_store])
    assert_refused(result, needle)
    assert not (tmp_path / "g.jsonl").exists()


def test_output_in_an_unwritable_folder_is_refused_before_work(built_store, models_dir, tmp_path):
    """Found (QA): `ep generate --out /proc/x.jsonl` generated everything, then crashed writing."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    result = run_cli(["generate", "--model", "tiny", "--checkpoint", "base", "--prompts", prompts,
                      "--out", "/proc/x.jsonl", "--max-new-tokens", "2", "--device", "cpu", "--no-progress",
                      "--models-dir", models_dir, "--store", built_store])
    assert_refused(result, "cannot write in /proc")


def test_writer_depth_is_bounded(models_dir, tmp_path):
    """Found (QA): --writer-depth 99999999999999999999 was accepted, lifting the queue's memory bound."""
    args = _harvest_args(models_dir, tmp_path / "store", "--writer-depth", "99999999999999999999")
    assert_refused(CliRunner().invoke(main, [str(a) for a in args]), "--writer-depth must lie in 0..64")


def test_resumed_harvest_counts_only_new_rows(models_dir, tmp_path):
    """Found (QA): resuming 300 -> 600 tokens reported 'tokens': 344 (the skipped rows of the
    first batch counted too); the summary counts rows stored by this run."""
    import json

    store = tmp_path / "store"
    base = ["harvest", "--model", "tiny", "--checkpoint", "base", "--layers", "1,2", "--ctx", "32", "--batch-size",
            "4", "--device", "cpu", "--no-progress", "--models-dir", models_dir, "--store", store]
    first = CliRunner().invoke(main, [str(a) for a in [*base, "--max-tokens", "300"]])
    second = CliRunner().invoke(main, [str(a) for a in [*base, "--max-tokens", "600"]])
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert json.loads(first.stderr.strip().splitlines()[-1])["tokens"] == 300
    assert json.loads(second.stderr.strip().splitlines()[-1])["tokens"] == 300
