"""The one prompt loader: every stage reads katdata/prompts through it; hashes for provenance."""

import hashlib
from importlib import resources

import pytest

from katdata.errors import KatdataError
from katdata.prompt_files import names, prompt_hash, read_prompt


def test_every_shipped_prompt_reads_and_hashes_its_bytes():
    shipped = names()
    assert {"grade_open.txt", "rationale_check.txt", "judge_rationale.txt", "judge_tags.yaml", "tag.txt"} <= set(shipped)
    assert not {"verify_judge.txt", "judge_check.txt"} & set(shipped)  # renamed: "judge" is the KAT rationale only
    for name in shipped:
        raw = resources.files("katdata").joinpath("prompts", name).read_bytes()
        assert read_prompt(name) == raw.decode("utf-8")
        assert prompt_hash(name) == hashlib.sha256(raw).hexdigest()
    assert prompt_hash("tag.txt") != prompt_hash("critic.txt")


@pytest.mark.parametrize("name", ["verify_judge.txt", "../recipe.py", ""])
def test_unknown_prompt_is_named_with_the_choices(name):
    with pytest.raises(KatdataError, match=f"prompt file '{name}' is not in katdata/prompts .*grade_open.txt"):
        read_prompt(name)


def test_stage_configs_name_existing_prompts():
    from katdata.judge import JudgeConfig
    from katdata.sample import SampleConfig
    from katdata.verify import VerifyConfig, grader_prompt

    j = JudgeConfig()
    for name in (j.prompt, j.rationale_check_prompt, SampleConfig().neutral_judge, VerifyConfig().grader_prompt):
        assert read_prompt(name)
    assert "{query}" in grader_prompt(VerifyConfig()) and "{rationale}" in read_prompt(j.rationale_check_prompt)


def test_one_stance_heuristic():
    from katdata import evaluate, judge

    assert evaluate.keyword_stance is judge.keyword_stance
    assert not hasattr(evaluate, "stance") and not hasattr(evaluate, "CUES")
