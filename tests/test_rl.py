"""katdata rl: reward functions on real KAT responses, the decision/answer split on real token ids of
the embedded tokenizer, group forcing, the step-level advantages, the recipe section, and (slow) a
few real GRPO steps of the embedded model on a tiny run folder with resume.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from katdata.errors import KatdataError
from katdata.rl import RLConfig, force, forced_prefix, side_by_side
from katdata.rl_rewards import (Scorer, better_mode, decision_length, group_normalise, mode_tag_ids,
                                reward_functions, segment_advantages, token_advantages)
from katdata.template import GENERATION_PREFIX
from katdata.verify import Verifier

from demo_data import demo_records

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def records():
    return demo_records(2, 2, seed=7)


def completion(rec) -> str:
    """What the model writes after the pre-filled <judge>\\n (TRL decodes without the end token)."""
    return rec.response[len(GENERATION_PREFIX):]


@pytest.fixture(scope="module")
def setup(records, tokenizer):
    queries = {r.id: SimpleNamespace(kind=r.kind, reference=r.reference, query=r.query, meta={}) for r in records}
    eos = [tokenizer.convert_tokens_to_ids(EOT)]
    scorer = Scorer(Verifier(), queries, eos)
    funcs = {f.__name__: f for f in reward_functions(scorer, ["group", "vote", "label"], 0.1, 64, True)}
    return funcs, eos


def ids_of(tokenizer, text: str, closed: bool = True) -> list[int]:
    return tokenizer(text + (EOT if closed else ""), add_special_tokens=False)["input_ids"]


def call(func, tokenizer, recs, texts, closed=None, **cols):
    closed = closed or [True] * len(texts)
    return func([""] * len(texts), texts, [ids_of(tokenizer, t, c) for t, c in zip(texts, closed)],
                id=[r.id for r in recs], **cols)


def test_format_and_answer_rewards_on_real_responses(records, setup, tokenizer):
    funcs, _ = setup
    on, off = records[0], records[-1]
    assert on.mode == "on" and off.mode == "off" and on.kind and off.kind
    good = [completion(on), completion(off)]
    assert call(funcs["format"], tokenizer, [on, off], good) == [1.0, 1.0]
    assert call(funcs["answer"], tokenizer, [on, off], good) == [1.0, 1.0]
    wrong = [completion(on).replace(f"<answer>\n{on.answer}", "<answer>\n-12345"),
             completion(off).replace(f"<answer>\n{off.answer}", "<answer>\nno idea")]
    assert call(funcs["answer"], tokenizer, [on, off], wrong) == [0.0, 0.0]
    assert call(funcs["format"], tokenizer, [on, off], wrong) == [1.0, 1.0]  # well-formed, just wrong
    # reward hacking through a second mode tag, and a truncated completion (no end token): format 0
    two_tags = completion(off).replace("<think_off>", "<think_off>\n<think_on>")
    cut = completion(on)[: len(completion(on)) // 2]
    assert call(funcs["format"], tokenizer, [off, on], [two_tags, cut], closed=[True, False]) == [0.0, 0.0]
    # a truncated completion that still holds a whole answer is not credited
    full_but_cut = call(funcs["answer"], tokenizer, [on], [completion(on)], closed=[False])
    assert full_but_cut == [0.0]


def test_answer_reward_is_none_without_a_reference(records, tokenizer):
    rec = records[-1]
    scorer = Scorer(Verifier(), {rec.id: SimpleNamespace(kind="exact", reference=None, query="", meta={})}, [2])
    funcs = {f.__name__: f for f in reward_functions(scorer, ["label"], 0.1, 64, False)}
    assert "cost" not in funcs
    assert call(funcs["answer"], tokenizer, [rec], [completion(rec)]) == [None]


def test_mode_reward_evidence_order_and_delta_rule(records, setup, tokenizer):
    funcs, _ = setup
    on = records[0]
    right = completion(on)
    wrong = right.replace(f"<answer>\n{on.answer}", "<answer>\n-12345")
    off_text = f"{on.judge}\n</judge>\n\n<think_off>\n<answer>\n{on.answer}\n</answer>"
    off_wrong = off_text.replace(f"<answer>\n{on.answer}", "<answer>\n-12345")
    cols = dict(label=["on"] * 4, p_on=[0.0] * 4, p_off=[0.0] * 4, vote_n=[0] * 4, delta=[0.1] * 4,
                forced=[None] * 4)
    # group evidence: think-on 2/2 correct, think-off 0/2: on is better
    got = call(funcs["mode"], tokenizer, [on] * 4, [right, right, off_wrong, off_wrong], **cols)
    assert got == [1.0, 1.0, 0.0, 0.0]
    # both modes correct in the group: off is within delta, so off is better
    got = call(funcs["mode"], tokenizer, [on] * 4, [right, wrong, off_text, off_wrong], **cols)
    assert got == [0.0, 0.0, 1.0, 1.0]
    # one mode only in the group and no vote evidence: the label decides (here "on")
    got = call(funcs["mode"], tokenizer, [on] * 2, [right, right], **{k: v[:2] for k, v in cols.items()})
    assert got == [1.0, 1.0]
    # vote evidence beats the label: p_off within delta of p_on
    vote = {**{k: v[:2] for k, v in cols.items()}, "p_on": [0.5, 0.5], "p_off": [0.45, 0.45], "vote_n": [4, 4]}
    assert call(funcs["mode"], tokenizer, [on] * 2, [right, off_text], **vote) == [0.0, 1.0]
    # a forced completion's mode is the forced one (its tag is in the prompt, not the completion)
    forced = {**{k: v[:1] for k, v in cols.items()}, "forced": ["off"],
              "prefix": [forced_prefix("off", "calculation", "math")]}
    assert call(funcs["mode"], tokenizer, [on], [f"{on.answer}\n</answer>"], **forced) == [0.0]
    scorer = Scorer(Verifier(), {on.id: SimpleNamespace(kind=on.kind, reference=on.reference, query="", meta={})}, [2])
    seq = {f.__name__: f for f in reward_functions(scorer, ["label"], 0.1, 64, False, score_forced=False)}
    assert call(seq["mode"], tokenizer, [on], [f"{on.answer}\n</answer>"], **forced) == [None]  # sequence-level
    # no mode tag written: 0
    assert call(funcs["mode"], tokenizer, [on], ["a rationale that never ends"], closed=[False],
                **{k: v[:1] for k, v in cols.items()}) == [0.0]
    assert better_mode(0.6, 0.5, 0.1) == "off" and better_mode(0.7, 0.5, 0.1) == "on"


def test_cost_counts_tokens(records, setup, tokenizer):
    funcs, _ = setup
    rec = records[-1]
    ids = ids_of(tokenizer, completion(rec))
    assert funcs["cost"]([""], [completion(rec)], [ids]) == [-min(len(ids), 64) / 64]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_decision_answer_split_falls_on_the_mode_tag(records, tokenizer, mode):
    tags = mode_tag_ids(tokenizer)
    rec = next(r for r in records if r.mode == mode)
    ids = ids_of(tokenizer, completion(rec))
    k = decision_length(ids, tags)
    decision, answer = tokenizer.decode(ids[:k]), tokenizer.decode(ids[k:])
    assert decision == f"{rec.judge}\n</judge>\n\n<think_{mode}>"
    assert answer.startswith("\n<think>\n" if mode == "on" else "\n<answer>\n") and answer.endswith(EOT)
    # truncated inside the think / answer block: the split stays on the tag
    cut = ids[: k + 5]
    assert decision_length(cut, tags) == k
    # truncated inside the judge: no decision was made, every token is a decision token
    assert decision_length(ids[: k - 3], tags) == k - 3
    # forced: the decision is in the prompt
    assert decision_length(ids, tags, forced=True) == 0
    adv = token_advantages([2.0], [-1.0], [k], len(ids) + 3)
    assert adv[0, :k].eq(2.0).all() and adv[0, k:].eq(-1.0).all()


def test_forced_rollouts_give_a_decision_advantage_when_the_policy_picks_one_mode():
    # group of 4: forced on, forced off, two free completions that both chose think-on; off is better
    rewards = [{"format": 1.0, "answer": 0.0, "mode": 0.0}, {"format": 1.0, "answer": 1.0, "mode": 1.0},
               {"format": 1.0, "answer": 0.0, "mode": 0.0}, {"format": 0.0, "answer": 0.0, "mode": 0.0}]
    decision, answer = segment_advantages(rewards, {"format": 0.2, "answer": 1.0, "mode": 1.0}, 4)
    assert decision[2] < 0 and decision[3] < 0  # the free think-on choices are pushed down
    assert answer[1] > 0 and answer[3] < min(answer[0], answer[2])
    assert group_normalise([1.0, 1.0, None, float("nan")], 4) == [0.0, 0.0, 0.0, 0.0]
    two = group_normalise([0.0, 1.0, 5.0, 5.0], 2)
    assert two[2:] == [0.0, 0.0] and math.isclose(two[1], -two[0])


def test_force_marks_the_first_completions_of_each_group():
    rows = [{"prompt": "P", "task_type": "calculation", "domain": "math", "id": str(i // 4)} for i in range(8)]
    out = force(rows, 4, 1)
    assert [r["forced"] for r in out] == ["on", "off", None, None] * 2
    assert out[0]["prompt"].endswith("</judge>\n\n<think_on>\n<think>\n") and out[2]["prompt"] == "P"
    assert out[1]["prefix"].startswith(GENERATION_PREFIX) and out[1]["prefix"].endswith("<think_off>\n<answer>\n")
    assert [r["forced"] for r in force(rows[:4], 4, 1, offset=2)] == [None, None, "on", "off"]  # second process


def test_recipe_section_and_bad_settings_fail_before_a_model_loads(tmp_path):
    from katdata.pipeline import STAGES
    from katdata.stages import get
    from katdata.recipe import Recipe

    assert STAGES.index("train") < STAGES.index("rl") < STAGES.index("eval")
    recipe = Recipe.model_validate({"rl": {"max_steps": 3}})
    assert recipe.rl.max_steps == 3 and recipe.rl.step_level
    with pytest.raises(Exception, match="num_generation"):
        Recipe.model_validate({"rl": {"num_generation": 3}})
    with pytest.raises(KatdataError, match="forced_per_mode"):
        from katdata.rl import run

        run(RLConfig(num_generations=2, forced_per_mode=1), tmp_path)
    with pytest.raises(KatdataError, match="katdata train"):
        run(RLConfig(), tmp_path)


def test_every_stage_of_the_rl_recipe_has_a_fingerprint_and_rl_refuses_other_settings(tmp_path):
    """`katdata run rl_quickstart --from rl` fingerprints every stage (rl included); a
    finished rl/ made with other settings is refused before any model loads, not silently reused."""
    import yaml

    from katdata import fingerprint
    from katdata.pipeline import STAGES
    from katdata.stages import get
    from katdata.recipe import Recipe
    from katdata.rl import run

    recipe = Recipe.model_validate(yaml.safe_load((Path(__file__).parents[1] / "katdata" / "recipes" / "rl_quickstart.yaml").read_text()))
    for stage in STAGES:
        fp = fingerprint.stage_fingerprint(recipe, get(stage), tmp_path)
        assert isinstance(fp["inputs"], dict), stage
    assert set(fingerprint.stage_fingerprint(recipe, get("rl"), tmp_path)["inputs"]) == {"train/split.json",
                                                                                   "train/adapter"}
    out = tmp_path / "rl"
    (out / "adapter").mkdir(parents=True)
    (out / "rl.json").write_text("{}")
    made = RLConfig(max_steps=2)
    fingerprint.write_folder(out, {"settings": fingerprint.section_settings("rl", made),
                                   "inputs": fingerprint.hash_inputs(
                                       [tmp_path / "train" / "split.json", tmp_path / "train" / "adapter"], tmp_path)})
    assert run(RLConfig(max_steps=2, num_threads=1), tmp_path) == {}  # same settings (threads are speed only)
    with pytest.raises(KatdataError, match=r"rl\.max_steps: 2 -> 3.*--from rl"):
        run(RLConfig(max_steps=3), tmp_path)


def test_side_by_side_table():
    m = {"template_validity": 0.5, "mode_agreement": 0.25, "think_on_rate": 0.1,
         "settings": {"auto": {"accuracy": 0.2, "mean_tokens": 40.0, "mean_tokens_by_mode": {"on": 90.0, "off": 30.0}},
                      "on": {"accuracy": 0.3}}}
    table = side_by_side({"adapted": m, "rl": m})
    assert table["rl"]["accuracy"] == {"auto": 0.2, "on": 0.3} and table["adapted"]["mean_tokens_by_mode"]["on"] == 90


# ---------------------------------------------------------------- real GRPO steps (slow)
@pytest.mark.slow
def test_real_grpo_steps_change_the_adapter_log_rewards_and_resume(tmp_path):
    import torch
    from safetensors.torch import load_file

    from katdata.rl import main
    from katdata.runfiles import RowWriter
    from katdata.train import TrainConfig, run as train_run

    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(demo_records(2, 3, seed=5))
    train_run(TrainConfig(holdout=1, max_steps=1, batch_size=2, save_steps=1, max_length=256, warmup_steps=0,
                          num_threads=1), tmp_path)
    sets = ["max_steps=2", "num_generations=3", "max_completion_length=40", "save_steps=1", "num_threads=1"]
    assert main([str(tmp_path)] + [a for s in sets for a in ("--set", s)]) == 0
    out = tmp_path / "rl"
    stats = json.loads((out / "rl.json").read_text())
    assert stats["steps"] == 2 and stats["resumed_from"] is None
    sft = load_file(tmp_path / "train" / "adapter" / "adapter_model.safetensors")
    rl = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sft.keys() == rl.keys()
    assert any(not torch.equal(sft[k], rl[k]) for k in sft)  # the policy moved
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [row for row in log if "rewards/format/mean" in row]
    assert len(steps) == 2
    assert all(k in steps[0] for k in ("rewards/answer/mean", "rewards/mode/mean", "kl", "mode/no_mode_tag_auto"))
    # killed after its first checkpoint: the rerun (same settings) resumes from it and ends at the same step
    shutil.rmtree(out / "adapter")
    (out / "rl.json").unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    assert main([str(tmp_path)] + [a for s in sets for a in ("--set", s)]) == 0
    stats = json.loads((out / "rl.json").read_text())
    assert stats["steps"] == 2 and stats["resumed_from"].endswith("checkpoint-1")
    # more steps are other settings: refused, not silently mixed into this folder
    sets[0] = "max_steps=3"
    with pytest.raises(KatdataError, match=r"rl\.max_steps: 2 -> 3"):
        main([str(tmp_path)] + [a for s in sets for a in ("--set", s)])
