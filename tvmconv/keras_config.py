"""Defaults Keras reads from keras.json: image_data_format and floatx."""
import json
import os


def _keras_json() -> dict:
    # Keras looks under $KERAS_HOME, else ~/.keras; an absent or unreadable file means defaults.
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def image_data_format() -> str:
    return _keras_json().get("image_data_format", "channels_last")


def floatx() -> str:
    return _keras_json().get("floatx", "float32")
