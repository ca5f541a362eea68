"""The standard distillation: validate -> synthesize -> finetune -> evaluate -> register, on the config's data.

Data is the config's local files (uploaded on submit) or registered data assets (`azure.data`), pinned to the
version current at submission. Each step runs the same `azdistill` command as local mode; see components/.
The settings tuned most often (build.SETTING_INPUTS) are typed pipeline inputs holding the config's values, which
the studio can change.
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
    """The pipeline job for `config`; `job_config` is the config file every step reads,
    `code` the folder uploaded as the components' code (default: the repository, see components/)."""
    azure = azure_settings(config)
    components = load_components(code)
    # The settings the studio or a schedule may change (build.SETTING_INPUTS): typed pipeline inputs whose defaults
    # and values are the config's (a float makes a number input, an int an integer, the method a string).
    tuned = setting_inputs(config)

    @dsl.pipeline(
        name=f"{config.name}-distill",
        description=f"Distil {config.teacher.label} into {azure.student_model or config.student.model} on the {config.task.type} data of '{config.name}'.",
    )
    def distillation(
        config_file, train, validation, test, student_model=None,
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
            config=config_file, train=train, validation=validation, test=test,
            data_version=config.data.version, shards=azure.synthesis_shards, **settings,
        )
        place(validate, azure.compute.cpu.model_copy(update={"instance_count": 1}))
        identify(validate, azure)
        return distillation_steps(components, config, config_file, validate, student_model, settings)

    job = distillation(
        config_file=Input(type="uri_file", path=str(Path(job_config).resolve())),
        student_model=student_model_input(config),
        **tuned,
        **data_inputs(config, resolve_when_running=False),
    )
    job.experiment_name = experiment_name(config)
    job.display_name = f"{config.name}@data-{config.data.version}"
    job.tags = pipeline_tags(config, "distill")
    job.settings.continue_on_step_failure = False
    return job
