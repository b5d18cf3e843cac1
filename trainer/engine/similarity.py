"""BLEU-4 and ROUGE of generated answers, computed the way LLaMA-Factory computes them, so numbers compare with
old runs: per example, ROUGE-1/2/L F-scores on jieba-segmented words (rouge-chinese), 0 when either side has no
word; BLEU-4 on characters with smoothing method 3 (nltk); each x100, rounded to 4 places, then averaged.

The libraries are an extra: pip install 'zerotune[metrics]'.
"""

from __future__ import annotations

from trainer.errors import ConfigError

NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _libraries():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as err:
        raise ConfigError(f"predict's metrics (BLEU-4, ROUGE) need {err.name}: pip install 'zerotune[metrics]' "
                          "(jieba, nltk, rouge-chinese).") from None
    jieba.setLogLevel(60)  # its dictionary-loading chatter
    return jieba, Rouge, sentence_bleu, SmoothingFunction().method3


def check_available() -> None:
    """Fail before any generation when the metric libraries are missing."""
    _libraries()


def scores(prediction: str, label: str) -> dict[str, float]:
    jieba, Rouge, sentence_bleu, smoothing = _libraries()
    hypothesis, reference = list(jieba.cut(prediction)), list(jieba.cut(label))
    out = {}
    if " ".join(hypothesis).split() and " ".join(reference).split():
        for name, value in Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0].items():
            out[name] = round(value["f"] * 100, 4)
    else:
        out.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    out["bleu-4"] = round(sentence_bleu([list(label)], list(prediction), smoothing_function=smoothing) * 100, 4)
    return out


def mean_scores(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """name -> the mean over examples (LLaMA-Factory's predict_bleu-4, predict_rouge-1, ... once prefixed)."""
    rows = [scores(p, l) for p, l in zip(predictions, labels)]
    return {name: float(sum(r[name] for r in rows) / len(rows)) if rows else 0.0 for name in NAMES}
