"""orchestrator/fingerprint.py: which config edits a resume refuses."""
from __future__ import annotations

from orchestrator.config import Config
from orchestrator.fingerprint import resume_differences


def test_a_key_added_after_the_checkpoint_is_no_edit_at_its_default_and_one_otherwise():
    defaults = Config().to_dict()
    current = Config().to_dict()
    old = Config().to_dict()
    del old["federation"]["temperature_pass"]  # a checkpoint written before the key existed
    assert resume_differences(old, current, 3) == ["federation.temperature_pass: '<unset>' -> 'reference'"]
    assert resume_differences(old, current, 3, defaults) == []
    current["federation"]["temperature_pass"] = "evaluation"  # not the behaviour the old run had
    assert resume_differences(old, current, 3, defaults) == [
        "federation.temperature_pass: 'reference' -> 'evaluation'"]


def test_layout_device_and_more_rounds_are_allowed_edits_fewer_rounds_are_not():
    saved, current = Config().to_dict(), Config().to_dict()
    current.update(memory_format="channels_last", device="cpu")
    current["federation"]["rounds"] = saved["federation"]["rounds"] + 10
    assert resume_differences(saved, current, 5, saved) == []
    current["federation"]["rounds"] = 4
    assert resume_differences(saved, current, 5, saved) == [
        "federation.rounds: 4 is below the 5 rounds the checkpoint has completed"]
    current["federation"]["rounds"] = 10
    current["federation"]["lr"] = 0.5
    assert resume_differences(saved, current, 5, saved) == ["federation.lr: 0.1 -> 0.5"]


def test_eval_batch_size_is_part_of_the_run():
    """It changes the numbers of BatchNorm without running statistics (splits longer than it are cut), so a resume
    refuses to change it."""
    saved, current = Config().to_dict(), Config().to_dict()
    current["federation"]["eval_batch_size"] = 50
    assert resume_differences(saved, current, 1, saved) == ["federation.eval_batch_size: 500 -> 50"]
