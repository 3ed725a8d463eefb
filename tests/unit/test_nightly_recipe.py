"""What a fine-tuning night changes in a member's recipe (`finetune_overrides`, merged under the member's own
overrides): fewer epochs, no warm-up, a scaled learning rate. The nights themselves: integration/test_nightly.py."""

from __future__ import annotations

from pipelines.training.family import finetune_overrides
from pipelines.training.recipe import load_recipe, merge_sections


def test_finetune_overrides_shorten_the_recipe():
    demo = load_recipe("demo")
    night = finetune_overrides(demo, epochs=2, lr_scale=0.1)
    tuned = demo.with_overrides(**merge_sections({"optim": {"weight_decay": 0.0}}, night))
    assert (tuned.schedule.epochs, tuned.optim.warmup_epochs) == (2, 0.0)
    assert tuned.optim.lr_per_256 == demo.optim.lr_per_256 * 0.1 and tuned.optim.weight_decay == 0.0
    assert merge_sections({"optim": {"lr_per_256": 1}}, {"optim": {"eps": 2}}) == {"optim": {"lr_per_256": 1,
                                                                                               "eps": 2}}
