"""The language domain's realistic tier (pipelines/infill_stories.py): the story grammar's
enumeration against its own sampling, the tokenizer, bad data refused by field and row, the
prior that cannot see s5, the posterior that starts as the prior, the reward as the LM's
log p(s5 | s1..s4), a checkpoint over another vocabulary refused, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.infill_hmm import ResidualPosterior
from pipelines.infill_stories import (BOS, CONTEXT_COLUMNS, EOS, PAD, SENTENCES, STORY_COLUMNS,
                                      STORY_WIDTH, WIDTHS, Config, InfillStoriesTask,
                                      StoryGrammar, Vocabulary, vocabulary_words)
from rtb_ray.config import AdapterConfig, ConfigError, load_config
from rtb_ray.tracking import read_run_record
from test_cli import ROOT, rtb_ray, sets

CONFIG = ROOT / "pipelines" / "configs" / "infill_stories.yaml"
# two goals, two places: a vocabulary of ~150 words, networks of a few thousand weights
TINY = dict(num_goals=2, num_places=2, num_stories=300, num_eval_stories=3, dim=16, depth=1,
            heads=2, residual_dim=16, residual_depth=1,
            pretrain={"steps": 5, "batch_size": 16},
            reward={"dim": 16, "layers": 1, "heads": 2, "steps": 5, "batch_size": 16})


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_task(tmp_path, **changes) -> InfillStoriesTask:
    return InfillStoriesTask(Config(**{**TINY, **changes,
                                       "prior_checkpoint": str(tmp_path / "prior.pt")}))


def randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (the zero heads included): outputs depend on all inputs read."""
    torch.manual_seed(seed)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net


def test_enumeration_sums_to_one_and_matches_sampling():
    grammar = StoryGrammar(num_goals=1, num_places=1, seed=3)
    stories = grammar.sample(40_000, np.random.default_rng(0))
    by_context: dict = {}
    for s1, s2, s3, s4, s5 in stories:
        c = grammar.context(s1, s2, s3)
        assert c is not None  # every sampled story is one the grammar can read back
        by_context.setdefault(c, []).append((s4, s5))
    c, rows = max(by_context.items(), key=lambda kv: len(kv[1]))
    infills = grammar.infills(c)
    assert len(infills) == 400 and sum(infills.values()) == pytest.approx(1, abs=1e-12)
    n = len(rows)
    counts = Counter(s4 for s4, _ in rows)
    assert set(counts) <= set(infills)
    for s4, p in infills.items():  # every frequency within 4.5 standard errors
        assert abs(counts[s4] / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1 / n, s4
    s4, _ = max(counts.items(), key=lambda kv: kv[1])
    endings = grammar.endings(c, s4)
    assert sum(endings.values()) == pytest.approx(1, abs=1e-12)
    after = Counter(s5 for z, s5 in rows if z == s4)
    for s5, p in endings.items():
        m = sum(after.values())
        assert abs(after[s5] / m - p) <= 4.5 * math.sqrt(p * (1 - p) / m) + 1 / m, s5
    # the Bayes infill: p(s4 | s1..s3, s5) ∝ p(s4 | s1..s3) p(s5 | s1..s4), normalised, and it
    # agrees with the stories' own frequencies given their ending
    s5, m = Counter(s5 for _, s5 in rows).most_common(1)[0]
    bayes = grammar.bayes(c, s5)
    assert sum(bayes.values()) == pytest.approx(1, abs=1e-12)
    joint = {z: p * grammar.endings(c, z).get(s5, 0.0) for z, p in infills.items()}
    for z, p in bayes.items():
        assert p == pytest.approx(joint[z] / sum(joint.values()), rel=1e-9)
    given = Counter(z for z, e in rows if e == s5)
    assert set(given) <= set(bayes)
    for z, p in bayes.items():
        assert abs(given[z] / m - p) <= 4.5 * math.sqrt(p * (1 - p) / m) + 1 / m, z
    # s5 tells s4 apart: the Bayes infill is far from p(s4 | s1..s3)
    assert 0.5 * sum(abs(bayes.get(z, 0) - p) for z, p in infills.items()) > 0.25


def test_tokenizer_round_trip_and_layout():
    grammar = StoryGrammar()
    vocab = grammar.vocab
    assert vocab.words[:3] == ["<pad>", "<bos>", "<eos>"] and (PAD, BOS, EOS) == (0, 1, 2)
    assert 200 <= len(vocab) <= 400  # "a few hundred words"
    assert vocabulary_words(10, 6) == vocab.words
    for story in grammar.sample(200, np.random.default_rng(1)):
        for name, words in zip(SENTENCES, story):
            ids = vocab.encode(words, WIDTHS[name])
            assert len(ids) == WIDTHS[name] and vocab.decode(ids) == words
    assert vocab.decode([vocab.ids["but"], PAD, vocab.ids["a"], PAD]) == ("but", "a")
    with pytest.raises(ValueError, match="'dragon' is not a word of the vocabulary"):
        vocab.encode(["a", "dragon"], 9)
    with pytest.raises(ValueError, match="more than 2"):
        vocab.encode(["a", "big", "bear"], 2)
    assert Vocabulary(vocabulary_words(1, 1)).sha != vocab.sha


def test_bad_data_is_refused_in_one_line_naming_field_and_row():
    cfg = load_config(CONFIG, ["task.num_stories=100", "task.num_eval_stories=2"])
    task = InfillStoriesTask(cfg.task)
    v = len(task.vocab)
    good = task.eval_stories.tolist()
    cases = []
    mask = [r[:] for r in good]
    mask[1][STORY_COLUMNS["s4"].start + 2] = v
    cases.append((mask, f"task.eval_stories: row 1, s4[2]: {v} is the mask id ({v}), which "
                        f"data never holds"))
    big = [r[:] for r in good]
    big[0][STORY_COLUMNS["s5"].start] = v + 3
    cases.append((big, f"task.eval_stories: row 0, s5[0]: {v + 3} is not a token id 0..{v - 1}"))
    cases.append(([good[0], good[1][:-1]],
                  f"task.eval_stories: row 1 has {STORY_WIDTH - 1} tokens, expected {STORY_WIDTH}"))
    for rows, expected in cases:
        with pytest.raises(ConfigError) as err:
            load_config(CONFIG, [f"task.eval_stories={json.dumps(rows)}"])
        assert "\n" not in str(err.value) and str(err.value).startswith(expected), str(err.value)
    # ids that are words, in an order the grammar never writes: refused when the task is made,
    # before any pretraining
    swapped = [r[:] for r in good]
    s4 = STORY_COLUMNS["s4"]
    swapped[1][s4] = swapped[1][s4][::-1]
    cfg = load_config(CONFIG, ["task.num_stories=100",
                               f"task.eval_stories={json.dumps(swapped)}"])
    with pytest.raises(ConfigError, match=r"^task.eval_stories: row 1: the grammar cannot write "
                                          r"s4 '.*' after s1..s3$"):
        InfillStoriesTask(cfg.task)


def test_the_prior_does_not_read_s5_and_the_posterior_starts_as_the_prior(tmp_path):
    for reads in ("story", "ending"):
        task = tiny_task(tmp_path, residual_reads=reads)
        prior = randomised(task.new_prior_network(), 0).requires_grad_(False)
        gen = torch.Generator().manual_seed(1)
        n, v = 32, len(task.vocab)
        x_t = torch.randint(0, v + 1, (n, task.length), generator=gen)  # masks included
        t = torch.randint(0, task.family.num_steps, (n,), generator=gen)
        cond = task.conditions(n, gen)
        other_s5, other_s1 = cond.clone(), cond.clone()
        other_s5[:, CONTEXT_COLUMNS["s5"]] = (cond[:, CONTEXT_COLUMNS["s5"]] + 1) % v
        other_s1[:, CONTEXT_COLUMNS["s1"]] = (cond[:, CONTEXT_COLUMNS["s1"]] + 1) % v
        out = prior(x_t, t, cond)
        assert torch.equal(out, prior(x_t, t, other_s5))  # s5 is never read
        assert not torch.allclose(out, prior(x_t, t, other_s1))  # s1 is

        posterior = task.posterior_network(prior, AdapterConfig())
        assert isinstance(posterior, ResidualPosterior)
        assert torch.equal(posterior(x_t, t, cond), out)  # exactly, at initialisation
        trainable = [name for name, p in posterior.named_parameters() if p.requires_grad]
        assert trainable and all(name.startswith("residual.") for name in trainable)
        randomised(posterior.residual, 2)  # once trained, the posterior reads s5
        assert not torch.allclose(posterior(x_t, t, cond), posterior(x_t, t, other_s5))
    with pytest.raises(ConfigError, match="^train.adapter.kind: lora does not apply"):
        task.posterior_network(prior, AdapterConfig(kind="lora"))


def test_log_reward_is_the_lm_log_prob_of_s5_given_s1_to_s4(tmp_path):
    task = tiny_task(tmp_path)
    lm = randomised(task.new_reward_lm(), 4).eval()
    task._models = (task.new_prior_network(), lm)  # instead of pretraining them
    cond = task.eval_conditions()
    x = task.eval_stories[:, STORY_COLUMNS["s4"]].clone()
    x[0] = torch.roll(x[0], 2)  # <pad> in the middle: dropped, as everywhere
    x[1, :3] = torch.tensor([task.vocab.ids[w] for w in ("so", "the", ".")])  # not a sentence
    got = task.log_reward(x, cond)
    assert got.shape == (3,) and got.dtype == torch.float32
    for i in range(3):
        words = lambda ids: [int(k) for k in ids if k != PAD]  # noqa: E731
        prefix = [BOS] + [k for s in ("s1", "s2", "s3") for k in
                          words(cond[i, CONTEXT_COLUMNS[s]])] + words(x[i])
        s5 = words(cond[i, CONTEXT_COLUMNS["s5"]])
        seq = torch.tensor([prefix + s5 + [EOS]])
        with torch.no_grad():
            lp = torch.log_softmax(lm(input_ids=seq).logits[0].double(), -1)
        expected = sum(lp[len(prefix) + j - 1, k].item() for j, k in enumerate(s5))
        assert got[i].item() == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match=f"infills must be tokens 0..{len(task.vocab) - 1}"):
        task.log_reward(torch.full((3, task.length), len(task.vocab)), cond)


def test_evaluate_scores_the_references_and_the_bayes_infill(tmp_path):
    task = tiny_task(tmp_path)
    cond = task.eval_conditions().repeat_interleave(40, 0)
    refs = task.eval_stories[:, STORY_COLUMNS["s4"]].repeat_interleave(40, 0)
    m = task.evaluate(refs, cond)
    assert m["bleu4"] == pytest.approx(1) and m["gleu"] == pytest.approx(1)
    assert m["invalid_rate"] == 0 and 0 < m["grammar_prob"] <= 1
    bayes = task.sample_bayes(cond, torch.Generator().manual_seed(0))
    b = task.evaluate(bayes, cond)
    assert b["invalid_rate"] == 0 and 0 < b["distinct2"] <= 1
    # the exact sampler's mean p_grammar is, up to sampling error, what it should be
    assert b["grammar_prob"] == pytest.approx(b["bayes_grammar_prob"], rel=0.35)
    noise = torch.randint(3, len(task.vocab), refs.shape,
                          generator=torch.Generator().manual_seed(1))
    r = task.evaluate(noise, cond)
    assert r["invalid_rate"] == 1 and r["grammar_prob"] == 0 and r["bleu4"] < 0.2
    text = task.sample_text(bayes, cond)
    assert "[s4]" in text and "p_grammar" in text and "<pad>" not in text
    # the dataset source's rows: training stories' own infills, each valid in its context
    x, c = task.known_terminals(16, torch.Generator().manual_seed(2))
    assert x.shape == (16, task.length) and c.shape == (16, cond.shape[1])
    g = task.grammar_figures(x, c)
    assert g["valid"].all() and (g["bayes_p"] > 0).all()


def test_a_checkpoint_over_another_vocabulary_is_refused(tmp_path):
    small = tiny_task(tmp_path, num_goals=1)
    stats = small.pretrain(progress=False)
    assert small.prior_path().exists() and 0 <= stats["prior_invalid_rate"] <= 1
    assert np.isfinite(stats["reward_log_prob"]) and stats["grammar_log_prob_s5"] < 0
    other = tiny_task(tmp_path)  # two goals: more words, other ids
    with pytest.raises(ValueError, match=re.escape(
            f"prior_checkpoint {small.prior_path()}: a prior over another vocabulary "
            f"({len(small.vocab)} words, {small.vocab.sha}); this grammar's has "
            f"{len(other.vocab)} words, {other.vocab.sha} (refused)")):
        other.prior()
    prior, lm = tiny_task(tmp_path, num_goals=1)._load()  # its own vocabulary loads
    assert lm.config.vocab_size == len(small.vocab)


SMALL = [  # a tiny task and a short run: the final evaluation's keys, not its quality
    "task.num_goals=2", "task.num_places=2", "task.num_stories=400", "task.num_eval_stories=3",
    "task.dim=16", "task.depth=1", "task.heads=2", "task.residual_dim=16",
    "task.residual_depth=1", "task.pretrain={steps: 20, batch_size: 32}",
    "task.reward={dim: 16, layers: 1, heads: 2, steps: 20, batch_size: 32}",
    "train.steps=8", "train.batch_size=32", "train.group_size=4", "train.log_every_steps=4",
    "eval.every_steps=8", "eval.num_samples=30", "eval.final_num_samples=45",
    "checkpoint_every_steps=8", "runtime.rollout_batch_size=32", "replay.min_size_to_sample=64",
    "tracking.log_model=false", "torch_threads=1"]


def test_a_tiny_run_writes_the_metrics_and_the_samples_as_text(tmp_path):
    run = tmp_path / "run"
    rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run),
            *sets(SMALL), cache=tmp_path, check=True)
    final = json.loads((run / "final_eval.json").read_text())
    for key in ("bleu4", "gleu", "grammar_prob", "invalid_rate", "distinct2",
                "bayes_grammar_prob", "mean_log_reward", "elbo", "eubo"):
        assert np.isfinite(final[key]), key
    assert 0 <= final["bleu4"] <= 1 and 0 <= final["invalid_rate"] <= 1
    assert final["num_samples"] == 45  # 15 per evaluation story
    assert list((tmp_path / "infill_stories").glob("prior-*.pt"))  # pretrained once, cached
    text = (run / "eval" / "step_8.txt").read_text()
    assert "step 8" in text and "[s4]" in text and "p_grammar" in text
    # the samples as text land in MLflow beside the picture (rtb_ray/run_dir.py log_eval), in
    # the store the run recorded
    from mlflow.tracking import MlflowClient

    record = read_run_record(run)
    listed = MlflowClient(record["tracking_uri"]).list_artifacts(record["run_id"], "eval")
    logged = {Path(a.path).name for a in listed}
    assert {"step_8.txt", "step_8.png", "step_0.txt"} <= logged
