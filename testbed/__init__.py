"""The accuracy test bed: a LLaVA-1.5-architecture VLM trained here on a shapes VQA task, so that
budgets and selectors can be compared where no real checkpoint can be downloaded (docs/testbed.md).

`task` (images, questions, the evaluation set), `data` and `reading` (training data, packed
reading), `spec` (sizes, schedule), `tower` (stage 1) and `model` (the whole recipe behind `make
shapes-model`), `report` (validity checks and targets of `make accuracy`), `sweep` (an offline
gamma / selector sweep). Run from the checkout (not installed).
"""
