"""EleutherAI's lm-evaluation-harness (0.4.13, code no one here wrote) on our model, both ways.

One tiny checkpoint (``llama4.save`` of a random model whose weights are re-drawn at O(1) scale,
so every component moves the log-probabilities, plus a BPE ``tokenizer.model`` trained with our
own trainer) is evaluated on our shipped offline tasks

* in process: ``import llama4.eval; lm_eval.simple_evaluate(model="llama4", ...)``, and
* over HTTP: lm-eval's own ``local-completions`` client against ``llama4 serve`` started as a
  subprocess on a free loopback port, its tokenizer found through our ``/tokenizer_info`` etc.

Both give identical accuracies and generations, and each request's log-likelihood (multiple
choice and rolling) equals the same sum computed by HF transformers' ``Llama4ForCausalLM`` on the
checkpoint (fp32, <= 1e-4). The shipped task data is checked to be what the generator makes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from oracles import require

import llama4
from llama4.model import ModelArgs, Transformer

lm_eval = require("lm_eval")
transformers = require("transformers")
httpx = require("httpx")
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llama4.eval import lm_eval_data  # noqa: E402
from llama4.eval.harness import TASKS_DIR, run_lm_eval  # noqa: E402

TOL = 1e-4
MC_TASKS = ["llama4_langid", "llama4_udhr_article", "llama4_cloze"]
ALL_TASKS = MC_TASKS + ["llama4_corpus_text", "llama4_verifiable"]
LIMIT = 6
pytestmark = pytest.mark.usefixtures("one_thread")


def redraw_(model: torch.nn.Module, seed: int) -> None:
    """O(1)-scale weights: norms uniform in [0.5, 1.5], embeddings N(0, 1), matrices N(0, 1/fan_in)
    (fan_in: last dim of nn.Linear weights, dim 1 of stacked experts), router at 2/sqrt(D)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] if p.dim() == 3 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 if "router" in name else 1.0) / math.sqrt(fan_in))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from llama4.data.corpus import MAIN_LANGUAGES
    from llama4.tasks.udhr import udhr_articles
    from llama4.tokenizer.bpe import train_bpe
    from llama4.tokenizer.files import write_tiktoken_bpe

    d = tmp_path_factory.mktemp("lm-eval") / "tiny-bpe"
    arts = udhr_articles()
    ranks = train_bpe([a for lang in MAIN_LANGUAGES for a in arts[lang]], 2048 + 1024)
    args = ModelArgs(vocab_size=2048 + 1024, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                     n_experts=4, top_k=2, expert_dim=32, dense_dim=96, interleave_moe_layer_step=2,
                     nope_layer_interval=2, attention_chunk_size=32, floor_scale=16.0, max_seq_len=2048)
    torch.manual_seed(0)
    m = Transformer(args)
    redraw_(m, seed=1)
    llama4.save(m, d)
    write_tiktoken_bpe(d / "tokenizer.model", ranks)
    return d


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.Llama4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(model_dir):
    """``llama4 serve`` in its own process, on loopback."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llama4", "serve", "--model", str(model_dir), "--port", str(port),
                             "--threads", "1", "--max-batch", "4", "--max-context", "2048", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "llama4 serve did not start"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def evaluate(model, **kw) -> dict:
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=ALL_TASKS, limit=LIMIT, task_manager=manager, log_samples=True,
                                   **kw)


@pytest.fixture(scope="module")
def in_process(model_dir):
    import llama4.eval  # noqa: F401  registers model="llama4" with lm-eval

    return evaluate("llama4", model_args=f"pretrained={model_dir},batch_size=4")


@pytest.fixture(scope="module")
def over_http(served, model_dir):
    api = get_model("local-completions")(base_url=served + "/v1/completions", model=model_dir.name,
                                         tokenizer_backend="auto", batch_size=4, max_retries=1)
    assert api.tokenizer_backend == "remote"  # our /tokenizer_info etc., no hub tokenizer
    return evaluate(api)


def hf_loglikelihood(hf, ids: list[int], n_cont: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits.float()[0, :-1], -1)
    # fp32 log-probs, summed in float64 as lm-eval sums the API's (a fp32 sum of 600 tokens rounds by ~1e-4)
    return logp[-n_cont:].gather(-1, torch.tensor(ids[-n_cont:]).unsqueeze(-1)).double().sum().item()


@pytest.mark.slow
def test_in_process_and_http_agree(in_process, over_http):
    a, b = in_process["results"], over_http["results"]
    for task in MC_TASKS:
        assert a[task]["acc,none"] == b[task]["acc,none"] and a[task]["acc_norm,none"] == b[task]["acc_norm,none"]
        for sa, sb in zip(in_process["samples"][task], over_http["samples"][task], strict=True):
            assert sa["doc_id"] == sb["doc_id"]
            for (la, ga), (lb, gb) in zip([r[0] for r in sa["resps"]], [r[0] for r in sb["resps"]], strict=True):
                assert abs(la - lb) <= TOL and ga == gb
    bpb = a["llama4_corpus_text"]["bits_per_byte,none"]
    assert bpb == pytest.approx(b["llama4_corpus_text"]["bits_per_byte,none"], rel=1e-6) and bpb > 1
    gen_a = [s["resps"][0][0] for s in in_process["samples"]["llama4_verifiable"]]
    gen_b = [s["resps"][0][0] for s in over_http["samples"]["llama4_verifiable"]]
    assert gen_a == gen_b and any(gen_a)
    assert a["llama4_verifiable"]["score,none"] == b["llama4_verifiable"]["score,none"]
    print({t: (a[t].get("acc,none"), b[t].get("acc,none")) for t in MC_TASKS}, "bpb", bpb)


@pytest.mark.slow
@pytest.mark.parametrize("way", ["in_process", "over_http"])
def test_loglikelihoods_match_transformers(way, request, model_dir, hf_model):
    from llama4.eval.lm_eval_model import Llama4LM

    run = request.getfixturevalue(way)
    lm = Llama4LM(pretrained=str(model_dir))  # the tokenization both runs used (the server's /tokenize)
    diffs, rolling = [], []
    for task in MC_TASKS:
        for s in run["samples"][task]:
            for (ctx, cont), resp in zip(s["arguments"], s["resps"], strict=True):
                c_ids, t_ids = lm._encode_pair(ctx, cont)
                diffs.append(abs(resp[0][0] - hf_loglikelihood(hf_model, c_ids + t_ids, len(t_ids))))
    for s in run["samples"]["llama4_corpus_text"]:  # rolling: one window holds each passage
        ids = lm.tok_encode(s["doc"]["text"])
        assert 100 < len(ids) < 2000
        rolling.append(abs(s["resps"][0][0] - hf_loglikelihood(hf_model, [lm.prefix_token_id] + ids, len(ids))))
    print(f"{way}: {len(diffs)} loglikelihood requests: max |ours - transformers| = {max(diffs):.2e}; "
          f"{len(rolling)} rolling: {max(rolling):.2e}")
    assert len(diffs) == 3 * LIMIT * 4 and len(rolling) == LIMIT
    assert max(diffs + rolling) <= TOL


def test_rolling_windows_and_truncation_match_transformers(model_dir, hf_model):
    """A text longer than max_length is scored over lm-eval's rolling windows, each window by
    itself; a context longer than the window is cut from the left."""
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance

    from llama4.eval.lm_eval_model import Llama4LM

    lm = Llama4LM(pretrained=str(model_dir), max_length=48, batch_size=3)
    text = json.loads((TASKS_DIR / "corpus_text.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    ids = lm.tok_encode(text)
    windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        ids, lm.prefix_token_id, 48, 1)]
    assert len(windows) > 3 and sum(len(c) for _, c in windows) == len(ids)
    want = sum(hf_loglikelihood(hf_model, ctx + cont, len(cont)) for ctx, cont in windows)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert abs(got - want) <= TOL
    ctx, cont = text[:400], text[400:430]
    c_ids, t_ids = lm._encode_pair(ctx, cont)
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
    assert len(c_ids) + len(t_ids) > 49  # the model reads the last 48 tokens, the 49th is predicted
    assert abs(ll - hf_loglikelihood(hf_model, (c_ids + t_ids)[-49:], len(t_ids))) <= TOL


def test_shipped_data_is_generated_and_up_to_date():
    first, again = lm_eval_data.generate(), lm_eval_data.generate()
    assert first == again  # deterministic
    for name, text in first.items():
        shipped = (TASKS_DIR / name).read_text(encoding="utf-8")
        assert shipped == text, f"{name} is stale: run python -m llama4.eval.lm_eval_data"
    assert lm_eval_data.main(["--check"]) == 0


def test_tasks_load_from_any_directory_and_verify(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.chdir(tmp_path)  # data_files are relative to the YAMLs, not to the working directory
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(ALL_TASKS) | {"llama4_mc"} <= set(manager.all_tasks)
    tasks = manager.load(ALL_TASKS)["tasks"]
    for name in ALL_TASKS:
        lines = (TASKS_DIR / f"{name.removeprefix('llama4_')}.jsonl").read_text(encoding="utf-8").count("\n")
        assert len(tasks[name].eval_docs) == lines > 10
    spec = importlib.util.spec_from_file_location("llama4_lm_eval_loader", TASKS_DIR / "loader.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    docs = [json.loads(line) for line in (TASKS_DIR / "verifiable.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len({d["task"] for d in docs}) >= 10
    for d in docs:  # the verifier wiring: the reference reply scores 1, an empty one 0
        assert loader.score_verifiable(d, [d["answer"]]) == {"score": 1.0}
        assert loader.score_verifiable(d, [""]) == {"score": 0.0}


def test_bad_input_is_named(tmp_path, model_dir):
    from llama4.eval.lm_eval_model import Llama4LM

    with pytest.raises(FileNotFoundError, match="nowhere"):
        Llama4LM(pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="pretrained=DIR"):
        Llama4LM()
    with pytest.raises(ValueError, match="unknown model_args.*'temprature'"):
        Llama4LM(pretrained=str(model_dir), temprature=0)
    with pytest.raises(ValueError, match="batch_size"):
        Llama4LM(pretrained=str(model_dir), batch_size="many")
    with pytest.raises(ValueError, match="unknown lm-eval task.*llama4_nope"):
        run_lm_eval(str(model_dir), ["llama4_langid", "llama4_nope"], None, 2, 2, str(tmp_path / "out"))


def test_llama4_eval_cli(model_dir, tmp_path):
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "llama4", "eval", "--model", str(model_dir), "--lm-eval-tasks",
                        "llama4_langid,llama4_cloze", "--limit", "3", "--out", str(out), "--threads", "1"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["suite"] == "lm-eval:llama4_langid,llama4_cloze"
    for t in ("llama4_langid", "llama4_cloze"):
        e = doc["tasks"][t]
        assert e["metric"] == "acc" and e["n"] == 3 and 0 <= e["score"] <= 1 and e["by_lang"]
        assert doc["lm_eval"]["results"][t]["acc,none"] == e["score"]
    assert len((out / "lm_eval_samples.jsonl").read_text().splitlines()) == 6
