"""The embedded image-text set for teaching a tiny model to see: scikit-learn's handwritten digits
(1,797 8x8 scans, offline in the package) with questions and answers in four languages.

    data = DigitsVQA.build(tile_size=28)
    data.pixel_values        # (1797, 3, 28, 28) bfloat16: each scan preprocessed as any image is
    data.labels              # (1797,) the digit
    data.dialog(i, "fr", 0)  # [{"role": "user", "content": [image, "Quel chiffre est-ce ?"]},
                             #  {"role": "assistant", "content": "Le chiffre sept."}]

The split is fixed (stratified, seeded): ``train`` and ``test`` hold different scans of every digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llama4.vision.preprocess import preprocess

NUMBER_WORDS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "fr": ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"],
    "es": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
    "de": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"],
}
QUESTIONS = {
    "en": ["What digit is this?", "Which number is shown in the picture?", "What number do you see?"],
    "fr": ["Quel chiffre est-ce ?", "Quel nombre voit-on sur l'image ?", "Quel chiffre vois-tu ?"],
    "es": ["¿Qué dígito es este?", "¿Qué número aparece en la imagen?", "¿Qué número ves?"],
    "de": ["Welche Ziffer ist das?", "Welche Zahl zeigt das Bild?", "Welche Zahl siehst du?"],
}
ANSWERS = {"en": "The digit {}.", "fr": "Le chiffre {}.", "es": "El dígito {}.", "de": "Die Ziffer {}."}
LANGUAGES = tuple(QUESTIONS)


def answer(label: int, lang: str) -> str:
    return ANSWERS[lang].format(NUMBER_WORDS[lang][label])


@dataclass
class DigitsVQA:
    pixel_values: torch.Tensor  # (N, 3, S, S) bfloat16
    labels: torch.Tensor  # (N,)
    scans: np.ndarray  # (N, 8, 8) uint8, for pictures
    train: np.ndarray  # indices
    test: np.ndarray

    @classmethod
    def build(cls, tile_size: int = 28, test_fraction: float = 0.2, seed: int = 0) -> "DigitsVQA":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("the digits set needs scikit-learn (pip install scikit-learn)") from None
        from PIL import Image

        d = load_digits()
        scans = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 ink -> 0..255 grey
        tiles = [preprocess(Image.fromarray(s, mode="L"), tile_size=tile_size) for s in scans]
        assert all(t.grid == (1, 1) for t in tiles)  # an 8x8 scan is one tile, no thumbnail
        labels = torch.as_tensor(d.target)
        rng = np.random.default_rng(seed)
        train, test = [], []
        for c in range(10):  # stratified: the same share of every digit is held out
            idx = rng.permutation(np.flatnonzero(d.target == c))
            n_test = int(round(len(idx) * test_fraction))
            test += idx[:n_test].tolist()
            train += idx[n_test:].tolist()
        return cls(pixel_values=torch.cat([t.pixel_values for t in tiles]), labels=labels, scans=scans,
                   train=np.array(sorted(train)), test=np.array(sorted(test)))

    def dialog(self, i: int, lang: str, q: int, with_answer: bool = True) -> list[dict]:
        user = {"role": "user", "content": [{"type": "image", "grid": (1, 1)},
                                            {"type": "text", "text": QUESTIONS[lang][q]}]}
        if not with_answer:
            return [user]
        return [user, {"role": "assistant", "content": answer(int(self.labels[i]), lang)}]

    def texts(self) -> list[str]:
        """Every question and answer: the corpus a tokenizer for this set is trained on."""
        out = [q for qs in QUESTIONS.values() for q in qs]
        out += [answer(c, lang) for lang in LANGUAGES for c in range(10)]
        return out
