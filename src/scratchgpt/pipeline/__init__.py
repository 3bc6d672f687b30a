"""One module per DVC stage, named after it (`lora-cls-finetune` -> `lora_cls_finetune`), each with the
`run_<stage>()` that `stages/<stage>.py` calls; plus what the stages share (`stage`), the report and the judge.

Imports every group below it; only the top-level modules (orchestration, compare, presets) import it.
"""
