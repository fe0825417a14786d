"""Whisper's language codes and the names OpenAI's ``verbose_json`` answers with.

OpenAI's transcription API reports ``"language": "english"`` where faster-whisper says
``"en"``. The table is Whisper's language set (a unit test checks it against the codes the
installed faster-whisper knows).
"""

from __future__ import annotations

WHISPER_LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian",
    "ln": "lingala", "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese",
    "yue": "cantonese",
}  # fmt: skip


def language_name(code: str | None) -> str:
    """``"en"`` -> ``"english"``; a code Whisper does not list is returned as it is."""
    if not code:
        return "english"
    return WHISPER_LANGUAGES.get(code.lower(), code)


def english_only(model: str) -> bool:
    """Whether MORAG_WHISPER_MODEL names an English-only model: Whisper's ``*.en`` models
    (``tiny.en``, ``Systran/faster-whisper-small.en``, ``/srv/models/base.en``). A name that
    does not say so is taken as multilingual; the worker, which loads it, still refuses
    what the model cannot do."""
    name = model.rstrip("/").rsplit("/", 1)[-1].lower()
    return name.endswith((".en", "-en"))


def language_problem(code: str, model: str) -> str | None:
    """Why ``code`` cannot be transcribed with ``model``, or None when it can."""
    if code.lower() not in WHISPER_LANGUAGES:
        return f"language {code!r} is not one Whisper knows: use an ISO 639-1 code such as 'en'"
    if code.lower() != "en" and english_only(model):
        return (
            f"the served model {model} is English-only: language {code!r} cannot be "
            "transcribed (use 'en', or leave language unset)"
        )
    return None
