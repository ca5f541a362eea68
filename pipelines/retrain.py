"""The scheduled retrain: the standard distillation on the latest versions of registered data assets.

The data asset references (`azure.data`, e.g. `azureml:sentiment-train@latest`) are passed to the validate
step as text and resolved there, when the job runs: a schedule built from this pipeline trains each time on the
versions current at that trigger, not on those current when the schedule was created (the SDK resolves an
`@latest` *input* once, at submission). The register step then compares the new student with the registered
champion, looked up when it runs, and promotes it only if it is better.
The settings tuned most often (build.SETTING_INPUTS) are typed pipeline inputs holding the config's values, which a
schedule can change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from azure.ai.ml import Input, dsl

from azdistill.azure.build import (
    azure_settings,
    data_inputs,
    distillation_steps,
    experiment_name,
    identify,
    load_components,
    pipeline_tags,
    place,
    setting_inputs,
    student_model_input,
)
from azdistill.config.schema import DistillConfig


def build(config: DistillConfig, job_config: Path, code: Optional[Path] = None):
    """The retrain pipeline job for `config`; `job_config` is the config file every step reads,
    `code` the folder uploaded as the components' code (default: the repository, see components/)."""
    azure = azure_settings(config)
    components = load_components(code)
    # The settings the studio or a schedule may change (build.SETTING_INPUTS): typed pipeline inputs whose defaults
    # and values are the config's (a float makes a number input, an int an integer, the method a string).
    tuned = setting_inputs(config)

    @dsl.pipeline(
        name=f"{config.name}-retrain",
        description=f"Retrain '{config.name}' on the latest data; promote the student only if it beats the champion.",
    )
    def retrain(
        config_file, train_asset, validation_asset, test_asset, student_model=None,
        synthesis_temperature=tuned["synthesis_temperature"], synthesis_max_new_tokens=tuned["synthesis_max_new_tokens"],
        training_epochs=tuned["training_epochs"], training_learning_rate=tuned["training_learning_rate"],
        training_kd_weight=tuned["training_kd_weight"], training_topk_weight=tuned["training_topk_weight"],
        training_method=tuned["training_method"],
    ):
        settings = {
            "synthesis_temperature": synthesis_temperature, "synthesis_max_new_tokens": synthesis_max_new_tokens,
            "training_epochs": training_epochs, "training_learning_rate": training_learning_rate,
            "training_kd_weight": training_kd_weight, "training_topk_weight": training_topk_weight,
            "training_method": training_method,
        }  # fmt: skip
        validate = components.validate(
            config=config_file, train_asset=train_asset, validation_asset=validation_asset, test_asset=test_asset,
            data_version="resolved-at-run-time", shards=azure.synthesis_shards, **settings,
        )
        place(validate, azure.compute.cpu.model_copy(update={"instance_count": 1}))
        identify(validate, azure)
        return distillation_steps(components, config, config_file, validate, student_model, settings)

    job = retrain(
        config_file=Input(type="uri_file", path=str(Path(job_config).resolve())),
        student_model=student_model_input(config),
        **tuned,
        **data_inputs(config, resolve_when_running=True),
    )
    job.experiment_name = experiment_name(config)
    job.display_name = f"{config.name}-retrain"
    job.tags = pipeline_tags(config, "retrain")
    job.settings.continue_on_step_failure = False
    return job
