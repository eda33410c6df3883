"""Recipe: a debug-size Llama 4 that learns to see, on CPU in minutes.

    python -m llama4.vision.learn --out runs/see       # train, evaluate, save model + picture grid

The model is the ``debug`` flavor with its vision tower (28 px tiles, 4 image tokens per tile) and
early fusion, trained from scratch with the SFT loss (assistant tokens only) to answer questions
about handwritten digits in English, French, Spanish and German (`llama4.vision.digits`). A small
BPE (`llama4.tokenizer.bpe`) is learned from the questions and answers. The evaluation asks every
question about every held-out scan and counts exact answers ("Le chiffre sept.") per language.

The output directory is a model directory (config.json + safetensors + tokenizer.model) that
``llama4.load`` and the inference CLI read, plus metrics.json and grid.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llama4.model import MultimodalTransformer, flavor, vision_flavor
from llama4.tokenizer.chat_format import encode_dialog
from llama4.vision.digits import LANGUAGES, QUESTIONS, DigitsVQA, answer


@dataclass
class SeeConfig:
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-3  # 3e-3 learns the answer template but never starts looking (loss stuck at ~0.45)
    warmup: int = 30
    weight_decay: float = 0.05
    shift: int = 2  # random translation of the training tiles, in pixels (0: none)
    bpe_merges: int = 200  # learned tokens beyond the 256 bytes
    seed: int = 0
    threads: int | None = None


def build_tokenizer(data: DigitsVQA, path: Path, merges: int):
    from llama4.tokenizer.bpe import N_BYTES, NUM_SPECIAL_TOKENS, train_tokenizer_file

    return train_tokenizer_file(data.texts() * 4, NUM_SPECIAL_TOKENS + N_BYTES + merges, path)


def build_model(tok) -> MultimodalTransformer:
    args = flavor("debug").replace(vocab_size=tok.n_words, max_seq_len=4096)
    model = MultimodalTransformer(args, vision_flavor("debug"), image_token_id=tok.special_tokens["<|patch|>"])
    model.init_weights()
    return model


class Prompts:
    """Token ids of every (question, answer) pair, encoded once: the image is always one tile."""

    def __init__(self, tok, data: DigitsVQA, tokens_per_tile: int):
        self.tok, self.data, self.n = tok, data, tokens_per_tile
        self.train: dict[tuple, tuple[list[int], list[bool]]] = {}
        for lang in LANGUAGES:
            for q in range(len(QUESTIONS[lang])):
                for c in range(10):
                    dialog = [data.dialog(0, lang, q, with_answer=False)[0],
                              {"role": "assistant", "content": answer(c, lang)}]
                    self.train[lang, q, c] = encode_dialog(tok, dialog, patches_per_tile=tokens_per_tile)

    def ask(self, lang: str, q: int) -> list[int]:
        ids, _ = encode_dialog(self.tok, self.data.dialog(0, lang, q, with_answer=False),
                               patches_per_tile=self.n, add_generation_prompt=True)
        return ids

    def batch(self, keys) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self.train[k] for k in keys]
        T = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), T), self.tok.pad_id)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for b, (s, m) in enumerate(seqs):  # right padding: causal attention never looks at it
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(m)] = torch.tensor(m)
        return ids, mask


def shift_tiles(px: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each tile by up to ``max_shift`` pixels, filling with black (-1)."""
    if max_shift <= 0:
        return px
    N, C, H, W = px.shape
    pad = F.pad(px, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, N), generator=gen)).tolist()
    return torch.stack([pad[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(N)])


def train(cfg: SeeConfig, model: MultimodalTransformer, data: DigitsVQA, prompts: Prompts, log=print) -> list[dict]:
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    history, t0 = [], time.time()
    model.train()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.choice(data.train, cfg.batch)
        langs = rng.choice(LANGUAGES, cfg.batch)
        keys = [(str(lang), int(rng.integers(len(QUESTIONS[lang]))), int(data.labels[i]))
                for i, lang in zip(idx, langs)]
        ids, mask = prompts.batch(keys)
        px = shift_tiles(data.pixel_values[idx].float(), cfg.shift, gen)
        logits = model(ids, pixel_values=px)
        target = mask[:, 1:]
        loss = F.cross_entropy(logits[:, :-1][target], ids[:, 1:][target])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4), "lr": lr, "s": round(time.time() - t0, 1)})
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.time() - t0:6.1f}s")
    model.eval()
    return history


@torch.no_grad()
def greedy(model, ids: torch.Tensor, pixel_values: torch.Tensor, max_new: int, stop: set[int]) -> list[list[int]]:
    """Greedy continuation of a batch of equal-length prompts (full forward per step: short prompts)."""
    out = [[] for _ in range(ids.shape[0])]
    done = [False] * ids.shape[0]
    for _ in range(max_new):
        nxt = model(ids, pixel_values=pixel_values, last_only=True)[:, -1].argmax(-1)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop
        if all(done):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out


def evaluate(model, tok, data: DigitsVQA, prompts: Prompts, indices=None) -> dict:
    """Every question in every language about every held-out scan: exact-answer accuracy per language."""
    indices = data.test if indices is None else indices
    stop = set(tok.stop_tokens)
    per_lang, samples = {}, []
    px = data.pixel_values[indices].float()
    for lang in LANGUAGES:
        right = total = 0
        for q in range(len(QUESTIONS[lang])):
            prompt = torch.tensor(prompts.ask(lang, q)).expand(len(indices), -1)
            outs = greedy(model, prompt, px, max_new=12, stop=stop)
            for i, o in zip(indices, outs):
                text = tok.decode([t for t in o if t not in stop]).strip()
                ok = text == answer(int(data.labels[i]), lang)
                right += ok
                total += 1
                samples.append({"index": int(i), "lang": lang, "question": QUESTIONS[lang][q], "answer": text,
                                "label": int(data.labels[i]), "correct": bool(ok)})
        per_lang[lang] = right / total
    return {"accuracy": per_lang, "n_per_language": total, "samples": samples}


def picture_grid(data: DigitsVQA, samples: list[dict], path: Path, n: int = 16, seed: int = 0) -> None:
    """A PNG of held-out scans with a question and the model's answer (red when wrong)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    pick = [samples[i] for i in rng.choice(len(samples), n, replace=False)]
    cell_w, cell_h, cols = 380, 120, 4
    grid = Image.new("RGB", (cols * cell_w, math.ceil(n / cols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(14)
    for k, s in enumerate(pick):
        x, y = (k % cols) * cell_w, (k // cols) * cell_h
        scan = Image.fromarray(255 - data.scans[s["index"]], mode="L").resize((96, 96), Image.Resampling.NEAREST)
        grid.paste(scan.convert("RGB"), (x + 8, y + 12))
        draw.text((x + 114, y + 22), s["question"], fill="black", font=font)
        wrong = "" if s["correct"] else f"   (it is {s['label']})"
        draw.text((x + 114, y + 56), s["answer"] + wrong, fill="darkgreen" if s["correct"] else "red", font=font)
        draw.text((x + 114, y + 88), s["lang"], fill="gray", font=font)
    grid.save(path)


def _font(size: int):
    """A TrueType font with accents (DejaVu: Debian's, or the copy matplotlib ships), else Pillow's."""
    from PIL import ImageFont

    candidates = ["DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
    try:
        import matplotlib

        candidates.append(str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"))
    except ImportError:
        pass
    for c in candidates:
        try:
            return ImageFont.truetype(c, size)
        except OSError:
            continue
    return ImageFont.load_default()


def run(cfg: SeeConfig, out: Path, log=print) -> dict:
    import llama4

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = DigitsVQA.build(tile_size=vision_flavor("debug").image_size)
    tok = build_tokenizer(data, out / "tokenizer.model.tmp", cfg.bpe_merges)
    model = build_model(tok)
    prompts = Prompts(tok, data, model.vision_args.tokens_per_tile)
    log(f"{len(data.train)} training / {len(data.test)} held-out scans; vocab {tok.n_words}; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {torch.get_num_threads()} threads")
    history = train(cfg, model, data, prompts, log)
    train_s = time.time() - t0
    result = evaluate(model, tok, data, prompts)
    llama4.save(model, out / "model")
    (out / "tokenizer.model.tmp").replace(out / "model" / "tokenizer.model")
    picture_grid(data, result["samples"], out / "grid.png", seed=cfg.seed)
    metrics = {"config": asdict(cfg), "accuracy": result["accuracy"], "n_per_language": result["n_per_language"],
               "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1), "history": history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    mistakes = [s for s in result["samples"] if not s["correct"]]
    (out / "mistakes.json").write_text(json.dumps(mistakes, indent=1, ensure_ascii=False) + "\n")
    log(f"held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in result["accuracy"].items()) +
        f"  (train {train_s:.0f}s, total {time.time() - t0:.0f}s)")
    return metrics


def evaluate_dir(model_dir: Path, out: Path, seed: int = 0, log=print) -> dict:
    """Re-evaluate a saved model directory (its own tokenizer.model): accuracy and picture grid."""
    import llama4
    from llama4.infer.model_dir import load_tokenizer_for

    model, tok = llama4.load(model_dir).eval(), load_tokenizer_for(model_dir)
    data = DigitsVQA.build(tile_size=model.vision_args.image_size)
    result = evaluate(model, tok, data, Prompts(tok, data, model.vision_args.tokens_per_tile))
    out.mkdir(parents=True, exist_ok=True)
    picture_grid(data, result["samples"], out / "grid.png", seed=seed)
    log("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in result["accuracy"].items()))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama4.vision.learn", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/see")
    p.add_argument("--evaluate", metavar="MODEL_DIR", default=None,
                   help="only evaluate a trained model directory (writes OUT/grid.png)")
    for f, v in asdict(SeeConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v) if v is not None else int, default=v)
    a = vars(p.parse_args(argv))
    out, model_dir = Path(a.pop("out")), a.pop("evaluate")
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    if model_dir:
        evaluate_dir(Path(model_dir), out, a["seed"])
    else:
        run(SeeConfig(**a), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
