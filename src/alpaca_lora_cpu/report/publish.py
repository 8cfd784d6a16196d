"""The report in MLflow: onto the pipeline's parent run the headline metrics (eval loss, each variant's
metric_table `headline` numbers as `<variant>.<name>`, the targets met), the report, its figures, params.yaml and
dvc.lock, and the recommended model with its Modelfile, registered as a new version of `alpaca-lora-cpu-gguf`;
the report also goes onto each variant's evaluate run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.metric_table import BY_NAME, headline_names
from alpaca_lora_cpu.report.inputs import Inputs
from alpaca_lora_cpu.tracking import git_commit, headline

REGISTERED_MODEL = "alpaca-lora-cpu-gguf"


def headline_metrics(inputs: Inputs, record: dict) -> dict[str, float]:
    """What the pipeline run shows: eval loss, each variant's comparison metrics (rounded as the flat DVC metrics
    are), the targets met and missed."""
    out = {k: record[k] for k in ("targets_met", "targets_missed", "targets_undecided")}
    if "eval_loss" in inputs.finetune:
        out["eval_loss"] = inputs.finetune["eval_loss"]
    paths = {name: BY_NAME[name].path or name for name in headline_names()}
    for v, m in inputs.variants.items():
        out.update({f"{v}.{k}": x for k, x in headline(m, paths).items()})
    return out


def attach_to_variant_runs(mlflow: Any, run_id: str, files: list[Path]) -> int:
    """Log the report onto the newest evaluate run of each variant measured under `run_id`."""
    client = mlflow.MlflowClient()
    runs = client.search_runs([mlflow.active_run().info.experiment_id],
                              f"tags.dvc_stage = 'evaluate' and tags.eval_run_id = '{run_id}'",
                              order_by=["attributes.start_time DESC"])
    seen = set()
    for r in runs:
        variant = r.data.tags.get("variant")
        if variant in seen:
            continue
        seen.add(variant)
        for f in files:
            client.log_artifact(r.info.run_id, str(f))
    return len(seen)


def publish(mlflow: Any, metrics: dict[str, float], files: list[Path], figures: Path,
            model: tuple[Path, Path] | None, recommended: dict | None) -> str | None:
    """Log the headline metrics and files onto the pipeline run; log and register the recommended model.
    Returns the registered version, if any."""
    from mlflow.entities import Metric

    from alpaca_lora_cpu.tracking import pipeline_run_id

    client, parent = mlflow.MlflowClient(), pipeline_run_id(mlflow)
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
        client.log_batch(parent, metrics=batch[i:i + 1000])
    for f in files:
        if f.is_file():
            client.log_artifact(parent, str(f))
    client.log_artifacts(parent, str(figures), artifact_path="figures")
    if not (model and recommended):
        return None
    for f in model:
        client.log_artifact(parent, str(f), artifact_path="model")
    return register_model(client, parent, "model", {
        "type": recommended["variant"], "kld_mean": f"{recommended['kld_mean']:.6g}",
        "size_mb": f"{recommended['size_mb']:.2f}", "gguf": model[0].name})


def register_model(client: Any, run_id: str, artifact_path: str, tags: dict[str, str]) -> str:
    """A new version of the registered model `REGISTERED_MODEL` from the run's `artifact_path` folder (created on
    first use), tagged with `tags` and the git commit; returns the version number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(REGISTERED_MODEL, description="The recommended quantized GGUF of each "
                                       "pipeline run: lowest mean KLD within report.recommend_max_mb.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(REGISTERED_MODEL, source, run_id=run_id,
                                          tags={**tags, "git_commit": git_commit()})
    return version.version
