import pytest

import configurator


def constants():
    return dict(lr=2e-4, epochs=10, backbone="resnet50", pretrained=False, image_size=(112, 96),
                _private=1, helper=print)


def test_flags_override_constants_with_their_types():
    ns = constants()
    config = configurator.parse(ns, ["--lr=1e-3", "--epochs", "3", "--backbone=resnet18",
                                     "--pretrained=True", "--image_size=64,48"])
    assert config == dict(lr=1e-3, epochs=3, backbone="resnet18", pretrained=True, image_size=(64, 48))
    assert ns["epochs"] == 3 and isinstance(ns["lr"], float)
    assert configurator.parse(constants(), ["--image_size=80"])["image_size"] == (80,)
    assert configurator.parse(constants(), ["--image_size=80x70"])["image_size"] == (80, 70)
    assert configurator.parse(constants(), ["--lr=1"])["lr"] == 1.0


@pytest.mark.parametrize("word,value", [("false", False), ("0", False), ("No", False), ("TRUE", True),
                                        ("yes", True), ("1", True)])
def test_booleans(word, value):
    assert configurator.parse(constants(), [f"--pretrained={word}"])["pretrained"] is value


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate=1"], "unknown option '--learning_rate=1'"),
    (["--lrr=1"], "unknown option"),  # no abbreviations either way
    (["--epochs=2.5"], "--epochs: expected an integer, got '2.5'"),
    (["--lr=fast"], "--lr: expected a number, got 'fast'"),
    (["--pretrained=maybe"], "--pretrained: expected true or false"),
    (["--image_size=big"], "--image_size: expected a comma-separated list"),
    (["--_private=2"], "unknown option"),
])
def test_bad_flags_are_errors_that_name_them(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        configurator.parse(constants(), argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_files_apply_in_order_and_flags_win(tmp_path):
    first = tmp_path / "first.py"
    first.write_text("import math\nlr = 1e-3\nepochs = 20\n")
    second = tmp_path / "second.py"
    second.write_text("epochs = 30\nimage_size = [64, 64]\n")
    config = configurator.parse(constants(), [str(first), str(second), "--lr=5e-4"])
    assert (config["lr"], config["epochs"], config["image_size"]) == (5e-4, 30, (64, 64))


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = 1\n")
    with pytest.raises(SystemExit):
        configurator.parse(constants(), [str(bad)])
    assert "'learning_rate' is not a constant" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        configurator.parse(constants(), [str(tmp_path / "missing.py")])
    assert "config file not found" in capsys.readouterr().err
    typo = tmp_path / "typo.py"
    typo.write_text("epochs = 'ten'\n")
    with pytest.raises(SystemExit):
        configurator.parse(constants(), [str(typo)])
    assert "--epochs: expected an integer" in capsys.readouterr().err


def test_positional_inputs_among_the_flags(tmp_path, capsys):
    ns = constants()
    config = configurator.parse(ns, ["a.jpg", "--epochs=3", "b.png", "c.gif"], positional=("photos", "PHOTO", "images"))
    assert config["photos"] == ["a.jpg", "b.png", "c.gif"] and config["epochs"] == 3 and ns["epochs"] == 3
    assert "photos" not in ns
    assert configurator.parse(constants(), ["--lr=1"], positional=("photos", "PHOTO", "images"))["photos"] == []
    # a python file is an input like any other, not a config file
    config_file = tmp_path / "first.py"
    config_file.write_text("epochs = 20\n")
    config = configurator.parse(constants(), [str(config_file)], positional=("photos", "PHOTO", "images"))
    assert config["photos"] == [str(config_file)] and config["epochs"] == 10
    with pytest.raises(SystemExit):
        configurator.parse(constants(), ["a.jpg", "--epoch=3"], positional=("photos", "PHOTO", "images"))
    assert "unknown option '--epoch=3'" in capsys.readouterr().err
