"""`kineflow eval` mechanics on tiny random-weight models (scores are meaningless there; the plumbing is not)."""

import json
from pathlib import Path

import pytest

import kineflow
from kineflow.runtime import cli
from kineflow.runtime.evaluation import IMAGE_TO_VIDEO_WORKFLOWS, SHIPPED_WORKFLOWS
from kineflow.shapes.shipped import ANIMATEDIFF_CHECKPOINT, HUNYUAN_VIDEO, HUNYUAN_VIDEO_I2V_DIT
from kineflow.training.tiny_models import write_models

PACK = Path(kineflow.__file__).resolve().parent


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    # under the shipped names, so that eval's default models are these
    paths = write_models(root, texts=["a red circle moves to the left on a blue background"], seed=0,
                         names=HUNYUAN_VIDEO)
    # ... and an image-to-video transformer grown from it, under the shipped one's name
    from safetensors.torch import load_file, save_file

    from kineflow.training.train_i2v import image_to_video_state

    _, state = image_to_video_state({k: v.float() for k, v in load_file(str(paths["dit"])).items()})
    save_file(state, str(paths["dit"].with_name(HUNYUAN_VIDEO_I2V_DIT)))
    return root


def test_eval_on_a_prompt_file_prints_json_scores(models_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red circle moves to the left on a blue background\n\nblue square going up, green backdrop\n")
    code = cli.main(["eval", "--prompts", str(prompts), "--steps", "2", "--models-dir", str(models_dir), "--json",
                     "--save-dir", str(tmp_path / "videos")])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["prompts"] == 2
    assert set(result["accuracy"]) == {"colour", "shape", "direction", "scale_change", "background"}
    assert result["counts"]["colour"]["scored"] == 2 and result["counts"]["direction"]["scored"] == 2
    # each prompt's scene, as asked and as judged, shows which prompts failed
    first = result["per_prompt"][0]
    assert first["prompt"].startswith("a red circle") and first["seed"] == 0
    assert first["expected"] == {"background": "blue", "objects": [
        {"colour": "red", "shape": "circle", "direction": "left", "scale_change": "none"}]}
    assert set(first["judged"]) == {"background", "objects"}
    assert [p["seed"] for p in result["per_prompt"]] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["eval_000.mp4", "eval_001.mp4"]


def test_eval_heldout_set_table(models_dir, capsys):
    assert cli.main(["eval", "-n", "2", "--steps", "1", "--models-dir", str(models_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 prompts" in out and "colour" in out and "temporal consistency" in out


def test_eval_generates_at_the_size_asked_for(models_dir, tmp_path, capsys):
    import av

    assert cli.main(["eval", "-n", "1", "--steps", "1", "--width", "48", "--height", "32", "--models-dir",
                     str(models_dir), "--json", "--save-dir", str(tmp_path)]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert (settings["width"], settings["height"]) == (48, 32)
    with av.open(str(tmp_path / "eval_000.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (48, 32)
    # --height defaults to --width, as its help says
    assert cli.main(["eval", "-n", "1", "--steps", "1", "--width", "48", "--models-dir", str(models_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["height"] == 48


def test_eval_with_missing_prompt_file_exits_2(capsys):
    assert cli.main(["eval", "--prompts", "/nonexistent/prompts.txt"]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def animatediff_dir(tmp_path_factory):
    from kineflow.training import tiny_sd

    root = tmp_path_factory.mktemp("ad_models")
    checkpoint = tiny_sd.write_models(root, seed=0)["checkpoint"]
    checkpoint.rename(checkpoint.with_name(ANIMATEDIFF_CHECKPOINT))  # eval's default checkpoint
    return root


@pytest.mark.parametrize("motion", ["kineflow_random_mm_v2.safetensors", "none"])
def test_eval_animatediff_with_and_without_motion_module(animatediff_dir, tmp_path, capsys, motion):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves to the left on a blue background\n")
    code = cli.main(["eval", "--family", "animatediff", "--motion-module", motion, "--prompts", str(prompts),
                     "--steps", "2", "--models-dir", str(animatediff_dir), "--json", "--save-dir", str(tmp_path / "v")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["frames"] == 16
    assert result["models"] == "kineflow_tiny_sd15.safetensors" + ("" if motion == "none" else f" + {motion}")
    import av

    with av.open(str(tmp_path / "v" / "eval_000.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16


def test_eval_rejects_a_frame_count_the_family_cannot_make(models_dir, capsys):
    assert cli.main(["eval", "-n", "1", "--frames", "10", "--models-dir", str(models_dir)]) == 1
    assert "1 + 4k" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["hunyuan_video", "animatediff"])
def test_eval_reconstruct_round_trips_heldout_clips_through_the_vae(family, models_dir, animatediff_dir, tmp_path,
                                                                     capsys):
    folder = animatediff_dir if family == "animatediff" else models_dir
    code = cli.main(["eval", "--family", family, "--reconstruct", "-n", "2", "--models-dir", str(folder), "--json",
                     "--save-dir", str(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "reconstruct" and result["prompts"] == 2
    assert result["counts"]["colour"]["scored"] >= 2  # every held-out clip has at least one shape to judge
    import av

    frames = 16 if family == "animatediff" else 9
    with av.open(str(tmp_path / "eval_001.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == frames


def test_eval_reconstruct_refuses_a_prompt_file(models_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves to the left on a blue background\n")
    assert cli.main(["eval", "--reconstruct", "--prompts", str(prompts), "--models-dir", str(models_dir)]) == 2
    assert "argument --prompts: not allowed with argument --reconstruct" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["hunyuan_video", "animatediff"])
def test_eval_samples_as_the_familys_shipped_workflow_unless_told_otherwise(family, models_dir, animatediff_dir,
                                                                            capsys):
    nodes = json.loads((PACK / "workflows" / "api" / SHIPPED_WORKFLOWS[family]).read_text()).values()
    sampler = next(node["inputs"] for node in nodes if node["class_type"] == "KineFlowSampler")
    latent = next(node["inputs"] for node in nodes if node["class_type"] == "KineFlowEmptyVideoLatent")
    folder = animatediff_dir if family == "animatediff" else models_dir
    assert cli.main(["eval", "--family", family, "--motion-module", "none", "-n", "1", "--models-dir", str(folder),
                     "--json"]) == 0
    out, err = capsys.readouterr()
    settings = json.loads(out)["settings"]
    sampling = ("steps", "cfg", "shift", "sampler_name", "scheduler")
    assert {name: settings[name] for name in sampling} == {name: sampler[name] for name in sampling}
    assert {name: settings[name] for name in ("width", "height", "frames")} == \
        {name: latent[name] for name in ("width", "height", "frames")}
    assert f"{sampler['steps']} steps, cfg {sampler['cfg']:g}" in err  # the settings used are printed

    if family == "hunyuan_video":  # given flags still win
        assert cli.main(["eval", "-n", "1", "--steps", "1", "--cfg", "2.5", "--shift", "5", "--sampler", "ddim",
                         "--models-dir", str(folder), "--json"]) == 0
        settings = json.loads(capsys.readouterr().out)["settings"]
        assert {name: settings[name] for name in sampling} == \
            {"steps": 1, "cfg": 2.5, "shift": 5.0, "sampler_name": "ddim", "scheduler": "default"}


@pytest.mark.parametrize("family", ["hunyuan_video", "animatediff"])
def test_eval_image_to_video_starts_from_each_clips_first_frame_and_scores_it(family, models_dir, animatediff_dir,
                                                                              capsys):
    folder = animatediff_dir if family == "animatediff" else models_dir
    options = ["--motion-module", "kineflow_random_mm_v2.safetensors"] if family == "animatediff" else []
    assert cli.main(["eval", "--family", family, "--image-to-video", "-n", "2", "--models-dir", str(folder),
                     "--json", "--steps", "2", *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "image_to_video" and result["prompts"] == 2
    if family == "hunyuan_video":
        assert result["models"] == HUNYUAN_VIDEO_I2V_DIT  # the shipped image-to-video transformer by default
    nodes = json.loads((PACK / "workflows" / "api" / IMAGE_TO_VIDEO_WORKFLOWS[family]).read_text()).values()
    sizes = next(node["inputs"] for node in nodes if node["class_type"] == "KineFlowImageToVideo")
    assert {k: result["settings"][k] for k in ("width", "height", "frames")} == \
        {k: sizes[k] for k in ("width", "height", "frames")}
    first = result["first_frame_psnr"]
    psnrs = [p["first_frame_psnr"] for p in result["per_prompt"]]
    assert first["scored"] == 2 and first["min"] == min(psnrs) and first["target"] == 28.0
    if family == "animatediff":  # the first frame is pinned: it is the VAE's own reconstruction of the image
        assert abs(first["mean"] - first["vae_ceiling_mean"]) < 0.05
    assert cli.main(["eval", "--family", family, "--image-to-video", "-n", "2", "--models-dir", str(folder), *options]) == 0
    assert "first frame vs input image: PSNR mean" in capsys.readouterr().out


def test_eval_image_to_video_refuses_a_prompt_file(models_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves to the left on a blue background\n")
    assert cli.main(["eval", "--image-to-video", "--prompts", str(prompts), "--models-dir", str(models_dir)]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
