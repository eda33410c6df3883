"""Our model inside EleutherAI's lm-evaluation-harness: ``model="llama4"``.

    import lm_eval, llama4.eval                      # importing llama4.eval registers the model
    lm_eval.simple_evaluate(model="llama4", model_args="pretrained=DIR,batch_size=8", tasks=[...])

The three requests lm-eval makes, answered as its Hugging Face model (``HFLM``) answers them:

* ``loglikelihood(context, continuation)``: the continuation's summed log-probability and whether
  greedy decoding would have produced it. Requests are sorted longest first and scored
  ``batch_size`` at a time (``llama4.infer.score``); the harness's ``TemplateLM`` splits the text
  into context and continuation tokens exactly as for every other model.
* ``loglikelihood_rolling(text)``: the whole text's log-likelihood, over windows of the model's
  context (lm-eval's own ``get_rolling_token_windows`` / ``make_disjoint_window``).
* ``generate_until(context, {until, max_gen_toks, ...})``: batched generation on our engine's
  simple path (``llama4.infer.generate_stream``), greedy unless ``do_sample``, stopping a batch as
  soon as every row has met ``<|end_of_text|>``, a stop string or ``max_gen_toks``.

Text is tokenized as the server's ``/tokenize`` does (special-token spellings are those tokens;
no BOS unless ``add_bos_token=True``, lm-eval's default for causal models), so lm-eval gets the
same token ids in process and through ``llama4 serve`` (``local-completions``).
"""

from __future__ import annotations

import logging

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tqdm import tqdm

# torch and the rest of llama4 load when the model is built, not when `import llama4.eval`
# registers it

log = logging.getLogger("llama4.eval.lm_eval")


def _int_arg(name: str, value, minimum: int = 1) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"llama4 lm-eval model: {name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"llama4 lm-eval model: {name} must be >= {minimum}, got {v}")
    return v


@register_model("llama4")
class Llama4LM(TemplateLM):
    """model_args: ``pretrained=DIR`` (a model directory, see ``llama4.infer.model_dir``),
    ``batch_size`` (sequences per forward, default 8; lm-eval's ``auto`` means the default),
    ``max_length`` (context window, default the model's ``max_seq_len``), ``dtype``, ``device``,
    ``add_bos_token`` (default False, as lm-eval's HFLM), ``max_gen_toks`` (default 256)."""

    def __init__(self, pretrained: str | None = None, batch_size=8, max_batch_size=None, max_length=None,
                 dtype=None, device=None, add_bos_token: bool = False, max_gen_toks=256, **unknown):
        super().__init__()
        if pretrained is None:
            raise ValueError("llama4 lm-eval model: model_args needs pretrained=DIR (a model directory)")
        if unknown:
            raise ValueError(f"llama4 lm-eval model: unknown model_args {sorted(unknown)}; known: pretrained, "
                             "batch_size, max_length, dtype, device, add_bos_token, max_gen_toks")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = max_batch_size or 8
        self.batch_size = _int_arg("batch_size", batch_size)
        from llama4.infer.model_dir import load_model_dir

        self.model, self.tok, self.name = load_model_dir(str(pretrained), dtype=None if dtype in (None, "auto")
                                                         else dtype, device=device)
        self.max_length = _int_arg("max_length", max_length or self.model.args.max_seq_len, 2)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self.add_bos_token = add_bos_token if isinstance(add_bos_token, bool) else str(add_bos_token) == "True"

    # --- tokenization (TemplateLM) ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # what an empty context is conditioned on

    @property
    def tokenizer_name(self) -> str:
        return f"llama4:{self.name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        from llama4.server.tokenize import encode_with_special_tokens

        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return encode_with_special_tokens(self.tok, string, bos)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # --- loglikelihood ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (sum of log p, is greedy)."""
        from llama4.infer.score import sequence_logprobs

        def longest_first(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(requests, sort_fn=longest_first, group_by=None)
        res = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="llama4: loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            seqs, n_cont = [], []
            for _, ctx, cont in chunk:
                if not cont:
                    raise ValueError("llama4 lm-eval model: a loglikelihood request has an empty continuation")
                if len(cont) > self.max_length:
                    raise ValueError(f"llama4 lm-eval model: a continuation of {len(cont)} tokens does not fit the "
                                     f"context window of {self.max_length} tokens (max_length)")
                # the model reads at most max_length tokens; the last one is only predicted (as HFLM
                # cuts: the context is left-truncated)
                seqs.append((ctx + cont)[-(self.max_length + 1):])
                n_cont.append(len(cont))
            for (key, _, _), scores, n in zip(chunk, sequence_logprobs(self.model, seqs), n_cont):
                tail = scores[len(scores) - n:]
                answer = (sum(tail.logprobs.tolist()), bool(tail.greedy.all()))
                res.append(answer)
                if key is not None:  # rolling windows carry no key; their request is cached whole
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return order.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm,
                                         desc="llama4: rolling windows")):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=True)):
            totals[i] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------------
    def _generate_batch(self, prompts: list[list[int]], until: list[str], max_new: int, temperature: float,
                        top_p: float, top_k: int | None, seed: int | None) -> list[str]:
        from llama4.infer.generation import generate_stream

        ids: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)  # end of text or max_new reached
        for piece in generate_stream(self.model, prompts, max_new, temperature, top_p, top_k, seed,
                                     stop=[self.tok.eos_id], sync_every=8):
            for r, new in enumerate(piece):
                ids[r] += new
                ended[r] = ended[r] or bool(new and new[-1] == self.tok.eos_id) or len(ids[r]) >= max_new
            if all(e or any(s in self.tok.decode(i) for s in until) for e, i in zip(ended, ids)):
                break  # every row is done: stop decoding the batch
        out = []
        for row in ids:
            text = self.tok.decode([t for t in row if t != self.tok.eos_id])
            cut = min((text.find(s) for s in until if s in text), default=len(text))
            out.append(text[:cut])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        reqs = [(ctx, kw, self.tok_encode(ctx)) for ctx, kw in (r.args for r in requests)]
        order = Collator(reqs, sort_fn=lambda x: (-len(x[2]), x[0]), group_by="gen_kwargs",
                         group_fn=lambda x: x[1])
        res = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="llama4: generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            kw = dict(chunk[0][1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok.decode([self.tok.eos_id])
            if eos not in until:
                until.append(eos)
            max_new = _int_arg("max_gen_toks", kw.pop("max_gen_toks", self.max_gen_toks))
            if max_new >= self.max_length:
                raise ValueError(f"llama4 lm-eval model: max_gen_toks {max_new} leaves no room for a prompt in "
                                 f"the context window of {self.max_length} tokens")
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0))
            if not sample:
                temperature = 0.0  # do_sample=False is greedy whatever the temperature, as in HF generate
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            top_k = kw.pop("top_k", None)
            seed = kw.pop("seed", None)
            if kw:
                log.warning("llama4 lm-eval model: ignoring generation arguments %s", sorted(kw))
            keep = self.max_length - max_new  # left-truncate the context, as HFLM does
            prompts = [(ids or [self.prefix_token_id])[-keep:] for _, _, ids in chunk]
            for (ctx, gen_kw, _), text in zip(chunk, self._generate_batch(
                    prompts, until, max_new, temperature, top_p, int(top_k) if top_k else None, seed)):
                res.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, gen_kw), text)
                bar.update(1)
        bar.close()
        return order.get_original(res)
