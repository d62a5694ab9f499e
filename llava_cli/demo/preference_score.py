"""The demo's preference stage, scored: held-out preference accuracy (the chosen shape's
log-probability above the rejected one's) of the merged model before `llava dpo` and of the
DPO output after it, on pictures neither saw."""

from __future__ import annotations

from pathlib import Path


def preference_scores(out: Path, data: Path, models: tuple[str, ...] = ("merged", "dpo")
                      ) -> dict[str, float]:
    """Accuracy on the pairs in `data/records.json` of each model folder under `out`."""
    from llava_cli.config.resolve import resolve_config
    from llava_cli.generation.answering_model import load_for_generation
    from llava_cli.train.dpo.preference_accuracy import preference_accuracy

    flags = {"data_path": str(data / "records.json"), "image_folder": str(data),
             "model_name_or_path": str(out / models[0])}
    config = resolve_config("dpo", flags=flags)
    scores = {}
    for name in models:
        loaded = load_for_generation(out / name)
        scores[name] = preference_accuracy(loaded.model, loaded.processor, config).accuracy
    return scores


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the dataloader workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
