"""The evaluation harness: each metric against a known case, the reference cache, the feature
extractors (tiny DINOv2 saved and loaded through from_pretrained), the speed measurement,
the best checkpoint kept during training, and `distill eval` on a run, an export and a
teacher."""

from __future__ import annotations

import json

import pytest
import torch

from distill import evaluate, metrics
from distill.cli import main as cli
from distill.export import export
from distill.features import Dinov2Features, dinov2_inputs, load_extractor
from distill.runs import find_checkpoint
from conftest import REPO, tiny_overrides

RECIPE_1STEP = str(REPO / "recipes" / "digits-dmd2-1step.yaml")

# ---------------------------------------------------------------------------- metrics


def _clusters(num: int, classes, seed: int = 0) -> torch.Tensor:
    """Points around ten well separated centres; only ``classes`` are drawn."""
    centres = torch.randn(10, 4, generator=torch.Generator().manual_seed(123)) * 10
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes)[torch.arange(num) % len(classes)]
    return centres[labels] + 0.5 * torch.randn(num, 4, generator=g)


def test_identical_sets_give_zero_distances_and_full_precision_recall():
    real = _clusters(600, range(10))
    assert metrics.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)


def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift():
    # an unbiased MMD² estimate: zero up to subset noise for two draws of one distribution
    # (not for one set against itself, where the shared points bias the cross term)
    g = torch.Generator().manual_seed(0)
    real, other = torch.randn(800, 16, generator=g), torch.randn(800, 16, generator=g)
    kid, _ = metrics.kernel_distance(real, other, subsets=50, subset_size=400)
    kids = [metrics.kernel_distance(real, other + shift, subsets=50, subset_size=400)[0] for shift in (0.25, 0.5, 1.0)]
    assert abs(kid) < 0.1 * kids[0]
    assert kids[0] < kids[1] < kids[2]


def test_half_the_classes_removed_loses_recall_not_precision():
    real = _clusters(1000, range(10))
    half = _clusters(1000, range(5), seed=1)
    full = _clusters(1000, range(10), seed=1)
    precision, recall = metrics.precision_recall(real, half, k=3)
    precision_full, recall_full = metrics.precision_recall(real, full, k=3)
    assert precision_full > 0.8 and recall_full > 0.8  # a fresh draw of the same distribution
    assert precision == pytest.approx(precision_full, abs=0.05)  # the kept classes are still realistic
    assert recall == pytest.approx(recall_full / 2, abs=0.05)  # but half the real modes are uncovered
    assert metrics.frechet_distance(real, half) > 10 * metrics.frechet_distance(real, _clusters(1000, range(10), seed=1))


def test_shift_raises_fd_by_its_squared_length():
    real = _clusters(800, range(10))
    fds = [metrics.frechet_distance(real, real + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    # same covariance: FD = |mu_r - mu_f|^2 = 4 * shift^2 for a shift of each of the 4 coordinates
    assert fds == pytest.approx([0.0, 1.0, 4.0, 16.0], abs=1e-5)


def test_frechet_distance_matches_the_closed_form():
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 5, generator=g, dtype=torch.float64)
    fake = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 1
    mu_r, mu_f = real.mean(0).numpy(), fake.mean(0).numpy()
    s_r, s_f = torch.cov(real.T).numpy(), torch.cov(fake.T).numpy()
    expected = ((mu_r - mu_f) ** 2).sum() + (s_r + s_f - 2 * scipy.linalg.sqrtm(s_r @ s_f).real).trace()
    assert metrics.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)


def test_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    # real radii (k=1) are all 1: 0.5 is inside, 10 is not -> precision 1/2.
    # fake radii (k=1) are both 9.5: every real point is within 9.5 of 0.5 -> recall 1.
    assert metrics.precision_recall(real, fake, k=1) == (0.5, 1.0)
    with pytest.raises(ValueError, match="more than 3 samples"):
        metrics.precision_recall(real, fake, k=3)


def test_class_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert metrics.class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


def test_clip_score_equals_the_models_own_cosine(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["zero", "one one", "two", "three"]
    score = metrics.clip_score(images, prompts, model, processor, batch_size=3)

    size = model.config.vision_config.image_size
    pixels = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=(pixels - mean) / std)
        cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert score == pytest.approx(float((100 * cosine.clamp(min=0)).mean()), rel=1e-5)
    assert 0.0 <= score <= 100.0
    with pytest.raises(ValueError, match="one prompt per image"):
        metrics.clip_score(images, prompts[:2], model, processor)


# ---------------------------------------------------------------------------- features and cache


def test_dinov2_features_load_frozen_and_resize_like_the_backbone(tiny_dinov2):
    extractor = load_extractor("dinov2", classifier=None, dinov2=str(tiny_dinov2))
    assert isinstance(extractor, Dinov2Features) and extractor.size == 28
    images = torch.rand(5, 1, 8, 8)
    features = extractor(images)
    assert features.shape == (5, 32)
    assert not any(p.requires_grad for p in extractor.parameters())
    pixels = dinov2_inputs(torch.full((2, 1, 8, 8), 0.5), 28, (0.5, 0.4, 0.3), (0.1, 0.2, 0.5))
    assert pixels.shape == (2, 3, 28, 28)
    assert torch.allclose(pixels[0, :, 5, 5], torch.tensor([0.0, 0.5, 0.4]), atol=1e-5)


def test_inception_features_say_what_they_need():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(FileNotFoundError, match="torch-fidelity"):
            load_extractor("inception", classifier=None, dinov2="unused")
    with pytest.raises(ValueError, match="unknown feature space 'clip'"):
        load_extractor("clip", classifier=None, dinov2="unused")


def _scorer(classifier, cache_dir, features=("classifier",), dinov2="unused"):
    return evaluate.Scorer(feature_spaces=list(features), dataset="digits", classifier=str(classifier), dinov2=dinov2,
                           cache_dir=cache_dir, nearest_k=3, kid_subsets=5, kid_subset_size=50, batch_size=256)


def test_reference_features_are_cached_by_dataset_and_extractor(tiny_classifier, tiny_dinov2, tmp_path, monkeypatch):
    calls = []
    real_extract = evaluate.extract
    monkeypatch.setattr(evaluate, "extract", lambda extractor, images, batch_size: calls.append(len(images)) or real_extract(extractor, images, batch_size))

    first = _scorer(tiny_classifier, tmp_path)
    assert calls == [1437]  # the digits training split, extracted once
    assert len(list(tmp_path.glob("digits-train-1437-*.safetensors"))) == 1
    second = _scorer(tiny_classifier, tmp_path)
    assert calls == [1437]  # read back, not extracted again
    assert torch.equal(first.references["classifier"], second.references["classifier"])

    _scorer(tiny_classifier, tmp_path, features=("classifier", "dinov2"), dinov2=str(tiny_dinov2))
    assert calls == [1437, 1437]  # a new extractor gets its own entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_scorer_on_the_real_digits_against_themselves(tmp_path):
    from distill.data import reference_set

    _, images, labels = reference_set("digits")
    scorer = _scorer(REPO / "models" / "digits-classifier", tmp_path)
    scores = scorer(images, labels)
    assert scores["fd_classifier"] == pytest.approx(0.0, abs=1e-6)
    assert scores["precision_classifier"] == scores["recall_classifier"] == 1.0
    assert scores["num_samples"] == 1437 and scores["class_accuracy"] > 0.98  # its training digits
    flipped = scorer(images.flip(-1), labels)  # mirrored digits: another distribution
    assert flipped["fd_classifier"] > 10 and flipped["recall_classifier"] < 0.9 and flipped["class_accuracy"] < 0.8


def test_scores_over_draws_are_the_mean_of_the_parts_scored_apart(tmp_path):
    from distill.data import reference_set

    _, images, labels = reference_set("digits")
    images, labels = images[:1200], labels[:1200]
    scorer = _scorer(REPO / "models" / "digits-classifier", tmp_path)
    mirrored = torch.cat([images[:600], images[600:].flip(-1)])  # the second draw another distribution
    parts = [scorer(mirrored[:600], labels[:600]), scorer(mirrored[600:], labels[600:])]
    over = scorer.over_draws(mirrored, labels, 2)
    for key in ("fd_classifier", "recall_classifier", "class_accuracy"):
        assert over[key] == pytest.approx((parts[0][key] + parts[1][key]) / 2)
    fds = [p["fd_classifier"] for p in parts]
    assert fds[1] > 10 * fds[0]
    assert over["fd_classifier_sd"] == pytest.approx(abs(fds[1] - fds[0]) / 2 ** 0.5)
    assert over["num_samples"] == 600 and over["draws"] == 2
    assert scorer.over_draws(images[:600], labels[:600], 1)["fd_classifier_sd"] == 0.0
    with pytest.raises(ValueError, match="1200 images do not split into 7 equal draws"):
        scorer.over_draws(mirrored, labels, 7)


def test_measure_speed_times_after_warmup(monkeypatch):
    clock = [0.0]
    calls = []
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: clock[0])

    def generate(num, seed):
        calls.append(num)
        clock[0] += 0.5 if len(calls) == 1 else 0.01 + 0.002 * num  # the first call is slow (warm-up)

    speed = evaluate.measure_speed(generate, batch_size=100, warmup=2, repeats=3)
    assert calls == [1] * 5 + [100] * 5
    assert speed["latency_ms"] == pytest.approx(12.0)
    assert speed["seconds_per_1000"] == pytest.approx(1000 * 0.21 / 100)
    assert speed["images_per_second"] == pytest.approx(100 / 0.21)


def test_markdown_table_has_a_row_per_target_and_skips_missing_columns():
    rows = [{"name": "a", "fd_classifier": 1.23456, "recall_classifier": 0.5},
            {"name": "b", "fd_classifier": 2.0, "recall_classifier": 1.0, "seconds_per_1000": 3.0}]
    table = evaluate.markdown_table(rows, ["classifier"]).splitlines()
    assert table[0] == "| sampler | FD ↓ | recall ↑ | s / 1,000 ↓ |"
    assert table[2] == "| a | 1.235 | 0.500 |  |" and table[3] == "| b | 2.000 | 1.000 | 3.00 |"


# ---------------------------------------------------------------------------- training and `distill eval`


@pytest.fixture(scope="module")
def scored_run(tiny_teacher, tiny_classifier, tmp_path_factory):
    from distill import train

    run = tmp_path_factory.mktemp("eval") / "run"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, tiny_classifier, run, **{
        "train.max_steps": 4, "eval.every": 1, "train.checkpoint_every": 2, "train.sample_every": 0})])
    return run


def test_training_logs_scores_and_keeps_the_best_checkpoint(scored_run):
    rows = [json.loads(line) for line in (scored_run / "scores.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"fd_classifier", "kid_classifier", "precision_classifier", "recall_classifier", "class_accuracy"} <= set(rows[0])
    best = json.loads((scored_run / "checkpoints" / "best" / "scores.json").read_text())
    winner = min(rows, key=lambda r: r["fd_classifier"])
    assert best["step"] == winner["step"] and best["fd_classifier"] == pytest.approx(winner["fd_classifier"])
    assert find_checkpoint(scored_run, "best") == scored_run / "checkpoints" / "best"
    assert find_checkpoint(scored_run).name == "step-000004"  # 'latest' never picks best


def test_evaluations_during_training_default_to_the_final_scores_sample_count(tiny_teacher, tiny_classifier, tmp_path):
    """eval.every_num_samples null (the default): each periodic evaluation draws eval.num_samples
    from the same seed as the final scores, so the last one is the final scores exactly (FD is
    biased by the sample count, so fewer samples would read higher than metrics.json)."""
    from distill import train

    run = tmp_path / "run"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, tiny_classifier, run, **{
        "train.max_steps": 2, "eval.every": 2, "eval.every_num_samples": "null", "train.sample_every": 0})])
    (last,) = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    final = json.loads((run / "metrics.json").read_text())
    assert last["step"] == 2 and last["num_samples"] == final["num_samples"] == 40
    assert last["fd_classifier"] == pytest.approx(final["fd_classifier"], rel=1e-6)
    assert last["recall_classifier"] == pytest.approx(final["recall_classifier"])


def test_training_plots_fd_and_recall_against_step_beside_the_scores(scored_run):
    import numpy as np
    from PIL import Image

    from distill import plots

    rows = [json.loads(line) for line in (scored_run / "scores.jsonl").read_text().splitlines()]
    picture = np.array(Image.open(scored_run / "scores.png").convert("RGB"))
    assert picture.shape == (2 * plots.PANEL_HEIGHT, plots.WIDTH, 3)  # FD above, recall below
    line = np.all(picture == plots.LINE, axis=2)
    for panel, key in enumerate(("fd_classifier", "recall_classifier")):
        ys, xs = np.nonzero(line[panel * plots.PANEL_HEIGHT : (panel + 1) * plots.PANEL_HEIGHT])
        assert xs.min() <= plots.MARGIN_LEFT + 3 and xs.max() >= plots.WIDTH - plots.MARGIN_RIGHT - 3  # steps 1 .. 4
        values = [r[key] for r in rows]
        first, last = ys[xs <= plots.MARGIN_LEFT + 3].mean(), ys[xs >= plots.WIDTH - plots.MARGIN_RIGHT - 3].mean()
        if values[0] != values[-1]:  # higher values are drawn higher up (smaller row index)
            assert (first < last) == (values[0] > values[-1]), (key, values)
        if len(set(values)) > 1:  # the range fills the panel: the largest value at the top, the smallest at the bottom
            assert ys.min() <= plots.MARGIN_TOP + 3 and ys.max() >= plots.PANEL_HEIGHT - plots.MARGIN_BOTTOM - 3


def test_best_checkpoint_missing_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no best checkpoint at .*eval.every"):
        find_checkpoint(tmp_path, "best")


def test_sample_of_a_run_names_its_kept_best_once(scored_run, tmp_path, capsys):
    """``distill sample RUN`` reads the latest checkpoint and says, once, that a best one of
    another step is kept (the prompts' config is read without resolving a checkpoint again)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(scored_run, run)
    scores = run / "checkpoints" / "best" / "scores.json"
    scores.write_text(json.dumps({**json.loads(scores.read_text()), "step": 1}))
    capsys.readouterr()
    cli(["sample", str(run), "--out", str(tmp_path / "grid.png"), "--num", "4"])
    err = capsys.readouterr().err
    assert err.count("using step-000004, the latest; this run also keeps checkpoints/best (step 1, fd_classifier ") == 1
    assert (tmp_path / "grid.png").is_file()


def test_shortlist_keeps_the_lowest_periodic_scores_and_forgets_steps_a_resume_drops(tmp_path):
    from distill import runs

    def saver(step):
        def save(directory):
            directory.mkdir(parents=True)
            (directory / "weights").write_text(f"student of step {step}")
        return save

    kept = [runs.keep_if_shortlisted(tmp_path, step=step, scores={"fd_x": fd}, metric="fd_x", size=2, save_student=saver(step))
            for step, fd in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0), (5, 0.5))]
    assert kept == [True, True, True, False, True]  # 4 is worse than both kept; 5 displaces 3
    assert [(e.step, e.scores["fd_x"]) for e in runs.shortlist(tmp_path, "fd_x")] == [(5, 0.5), (2, 1.0)]
    assert [e.step for e in runs.shortlist(tmp_path)] == [2, 5]  # no metric: by step
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "shortlist").iterdir()) == ["step-000002", "step-000005"]
    (tmp_path / "checkpoints" / "shortlist" / "step-000007" / "student").mkdir(parents=True)  # no scores.json: left out
    assert [e.step for e in runs.shortlist(tmp_path)] == [2, 5]

    entry = runs.shortlist(tmp_path, "fd_x")[1]
    runs.make_best(tmp_path, entry, {"fd_x": 0.7, "draws": 3})
    best = tmp_path / "checkpoints" / "best"
    assert (best / "student" / "weights").read_text() == "student of step 2"
    assert json.loads((best / "scores.json").read_text()) == {"step": 2, "fd_x": 1.0, "rescored": {"fd_x": 0.7, "draws": 3}}
    said = []
    runs.forget_steps_after(tmp_path, 3, report=said.append)  # a resume from step 3: entry 5 was chosen after it
    assert [e.step for e in runs.shortlist(tmp_path)] == [2]


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_rescore_top_makes_best_the_shortlisted_student_lowest_on_fresh_draws(tiny_teacher, tiny_classifier, tmp_path,
                                                                             capsys, lora_rank):
    """eval.rescore_top=2: the two lowest periodic scores are kept; at the end each is scored on
    eval.rescore_draws fresh draws (seeds apart from the periodic one and bench_quality's), the
    lowest mean becomes checkpoints/best, and one draw's FD is what ``distill eval`` gives for
    that student on that seed. A LoRA student's candidates are adapters on the teacher's network."""
    from distill import train

    run = tmp_path / "run"
    lora = {"student.lora.rank": lora_rank, "student.lora.alpha": lora_rank, "optim.student.lr": 1e-2,
            "train.ema_decay": 0} if lora_rank else {}
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, tiny_classifier, run, **{
        "train.max_steps": 4, "eval.every": 1, "train.checkpoint_every": 2, "train.sample_every": 0,
        "eval.rescore_top": 2, "eval.rescore_draws": 2, "eval.every_num_samples": "null", **lora})])
    periodic = {r["step"]: r["fd_classifier"] for r in map(json.loads, (run / "scores.jsonl").read_text().splitlines())}
    lowest = sorted(periodic, key=periodic.get)[:2]
    shortlisted = sorted(p.name for p in (run / "checkpoints" / "shortlist").iterdir())
    assert shortlisted == [f"step-{s:06d}" for s in sorted(lowest)]
    best = json.loads((run / "checkpoints" / "best" / "scores.json").read_text())
    rescored = best["rescored"]
    assert rescored["seeds"] == [1001, 2001] and rescored["draws"] == 2 and rescored["num_samples"] == 40
    table = {row["step"]: row for row in rescored["shortlist"]}
    assert sorted(table) == sorted(lowest)
    for step, row in table.items():
        assert row["periodic_fd_classifier"] == pytest.approx(periodic[step])
        assert row["fd_classifier"] == pytest.approx(sum(row["fd_classifier_draws"]) / 2)
        assert row["fd_classifier"] != pytest.approx(periodic[step])  # other draws than the periodic one
    chosen = min(table, key=lambda s: table[s]["fd_classifier"])
    assert best["step"] == chosen and rescored["fd_classifier"] == table[chosen]["fd_classifier"]
    assert best["fd_classifier"] == pytest.approx(periodic[chosen])  # its periodic scores are kept beside
    entry = run / "checkpoints" / "shortlist" / f"step-{chosen:06d}" / "student"
    assert (entry / "adapter_config.json").is_file() == bool(lora_rank)
    for f in entry.iterdir():
        assert (run / "checkpoints" / "best" / "student" / f.name).read_bytes() == f.read_bytes()
    assert f"checkpoints/best: step {chosen} (fd_classifier " in capsys.readouterr().out

    other = max(table, key=lambda s: table[s]["fd_classifier"])  # `distill eval` on one entry, on the first seed
    cli(["eval", str(run), "--checkpoint", str(entry.parent.with_name(f"step-{other:06d}")), "--out",
         str(tmp_path / "again"), "--num", "40", "--seed", "1001", "--batch-size", "20", "--classifier",
         str(tiny_classifier), "--cache-dir", str(tmp_path / "reference-cache"), "--no-speed", "--compare-num", "4",
         "--compare-steps", "2"])
    (row,) = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert row["fd_classifier"] == pytest.approx(table[other]["fd_classifier_draws"][0], rel=1e-4)


def test_rescore_top_is_inert_without_periodic_scores(tiny_teacher, tmp_path):
    """A recipe that sets eval.rescore_top still runs with evaluation off (eval.every: 0, no
    feature space): nothing is shortlisted and no best is kept; a bad rescore_draws is an error."""
    from distill import train
    from distill.config import load
    from distill.errors import ConfigError

    run = tmp_path / "run"
    train.main([RECIPE_1STEP, *tiny_overrides(tiny_teacher, None, run, **{"eval.rescore_top": 3, "train.max_steps": 1,
                                                                          "train.sample_every": 0})])
    assert (run / "checkpoints" / "step-000001").is_dir()
    assert not (run / "checkpoints" / "shortlist").exists() and not (run / "checkpoints" / "best").exists()
    with pytest.raises(ConfigError, match=r"eval.rescore_draws: must be at least 1, got 0"):
        load(RECIPE_1STEP, ["eval.rescore_draws=0"])


def test_distill_eval_on_a_run_an_export_and_a_teacher(scored_run, tiny_teacher, tiny_classifier, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["--num", "30", "--classifier", str(tiny_classifier), "--cache-dir", str(cache), "--batch-size", "15",
              "--compare-num", "4", "--compare-steps", "2"]

    cli(["eval", str(scored_run), "--checkpoint", "best", "--out", str(tmp_path / "run-eval"), "--no-speed", *common])
    (row,) = json.loads((tmp_path / "run-eval" / "metrics.json").read_text())
    assert row["name"].startswith("student run (best), 1 step") and row["num_samples"] == 30
    assert 0 <= row["precision_classifier"] <= 1 and 0 <= row["class_accuracy"] <= 1
    assert (tmp_path / "run-eval" / "metrics.md").read_text().startswith("| sampler | FD ↓ | KID ↓ | precision ↑")
    assert len(list((tmp_path / "run-eval").glob("grid-*.png"))) == 1

    exported = export(scored_run, tmp_path / "export", checkpoint="best")
    cli(["eval", str(exported), "--out", str(tmp_path / "export-eval"), *common])
    (exp_row,) = json.loads((tmp_path / "export-eval" / "metrics.json").read_text())
    # the export under stock diffusers draws the run's samples: same scores
    assert exp_row["fd_classifier"] == pytest.approx(row["fd_classifier"], rel=1e-4)
    assert exp_row["latency_ms"] > 0 and exp_row["images_per_second"] > 0
    assert (tmp_path / "export-eval" / "teacher-vs-student.png").is_file()  # the export's recipe names its teacher

    cli(["eval", str(tiny_teacher), "--solver", "all", "--steps", "2", "--out", str(tmp_path / "teacher-eval"), "--no-speed", *common])
    names = [r["name"] for r in json.loads((tmp_path / "teacher-eval" / "metrics.json").read_text())]
    assert names == ["teacher, DDIM, 2 steps", "teacher, DPM-Solver++, 2 steps"]
    assert "| teacher, DPM-Solver++, 2 steps |" in capsys.readouterr().out


def test_distill_eval_rejects_bad_settings_before_sampling(scored_run, tmp_path):
    with pytest.raises(SystemExit, match="eval.features: unknown feature space 'fid'"):
        cli(["eval", str(scored_run), "--features", "[fid]", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="neither a run directory"):
        cli(["eval", str(tmp_path), "--out", str(tmp_path / "x")])


def test_scorer_counts_pixels_outside_the_range_then_clamps(tmp_path):
    from distill.data import reference_set

    _, images, labels = reference_set("digits")
    scorer = _scorer(REPO / "models" / "digits-classifier", tmp_path)
    spilled = images.clone()
    spilled[:, :, :2] = -0.25  # the top two of 8 rows below 0 (below -1 in the model's scale)
    spilled[:10, :, -1] = 1.5  # and one row of 10 images above 1
    scores = scorer(spilled, labels)
    assert scores["out_of_range"] == pytest.approx(2 / 8 + 10 / 1437 / 8)
    clamped = scorer(spilled.clamp(0, 1), labels)
    assert clamped["out_of_range"] == 0.0 and clamped["fd_classifier"] == pytest.approx(scores["fd_classifier"])
    assert scorer(images, labels)["out_of_range"] == 0.0
