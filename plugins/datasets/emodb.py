"""EmoDB, the Berlin Database of Emotional Speech (Burkhardt et al. 2005): everything from the name ``SSTTTEV``.

``SS`` is the speaker (ten actors, whose sex and age EmoDB documents), ``TTT`` the text code (ten German
sentences, read in every emotion), ``E`` the emotion letter (German initials: W Wut, L Langeweile, E Ekel,
A Angst, F Freude, T Trauer, N neutral) and ``V`` the take. Label names follow RAVDESS's where the
emotion is the same (angry, disgust, fearful, happy, sad, neutral) and add ``bored``, so label sets and
`label_map` entries carry across corpora. The transcript is the sentence the code names: since every
sentence is read in every emotion it says nothing of the class, as in RAVDESS.
"""
from __future__ import annotations

import re
from typing import ClassVar, Iterator

from emofuse.core import (
    AUDIO,
    METADATA,
    TEXT,
    CorpusReader,
    CorpusReaderConfig,
    DataError,
    Sample,
    files_under,
    hookimpl,
)

#: Emotion letter -> label name.
EMOTIONS = {"W": "angry", "L": "bored", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad", "N": "neutral"}
#: Speaker code -> (sex, age in years at recording), from EmoDB's documentation.
SPEAKERS = {
    "03": ("male", 31), "08": ("female", 34), "09": ("female", 21), "10": ("male", 32), "11": ("male", 26),
    "12": ("male", 30), "13": ("female", 32), "14": ("female", 35), "15": ("male", 25), "16": ("female", 31),
}
#: Text code -> the German sentence, from EmoDB's documentation.
SENTENCES = {
    "a01": "Der Lappen liegt auf dem Eisschrank.",
    "a02": "Das will sie am Mittwoch abgeben.",
    "a04": "Heute abend könnte ich es ihm sagen.",
    "a05": "Das schwarze Stück Papier befindet sich da oben neben dem Holzstück.",
    "a07": "In sieben Stunden wird es soweit sein.",
    "b01": "Was sind denn das für Tüten, die da unter dem Tisch stehen?",
    "b02": "Sie haben es gerade hochgetragen und jetzt gehen sie wieder runter.",
    "b03": "An den Wochenenden bin ich jetzt immer nach Hause gefahren und habe Agnes besucht.",
    "b09": "Ich will das eben wegbringen und dann mit Karl was trinken gehen.",
    "b10": "Die wird auf dem Platz sein, wo wir sie immer hinlegen.",
}
AUDIO_EXTENSIONS = {".wav", ".ogg", ".oga", ".opus", ".flac", ".mp3"}
NAME = re.compile(r"^(\d\d)([ab]\d\d)([A-Z])([a-z])$")


class EmoDBConfig(CorpusReaderConfig):
    pass


class EmoDBReader(CorpusReader):
    """EmoDB clips: 7 emotions (boredom among them), speaker, sex and age, and the German sentence as text."""

    name: ClassVar[str] = "emodb"
    Config: ClassVar[type[EmoDBConfig]] = EmoDBConfig
    default_labels: ClassVar[tuple[str, ...]] = ("neutral", "bored", "happy", "sad", "angry", "fearful", "disgust")
    default_root: ClassVar[str] = "emodb"
    modalities: ClassVar[tuple[str, ...]] = (AUDIO, TEXT, METADATA)

    def samples(self) -> Iterator[Sample]:
        root = self.require_root()
        seen: dict[str, str] = {}
        found = 0
        for path in files_under(root):
            if not path.is_file() or path.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            found += 1
            m = NAME.match(path.stem)
            if not m:
                self.bad(path, "file name is not an EmoDB code (speaker, text, emotion, take: 03a01Fa.wav)")
                continue
            speaker, text, emotion, take = m.groups()
            unknown = [f"{what} {code!r}" for what, code, known in
                       (("speaker", speaker, SPEAKERS), ("text", text, SENTENCES), ("emotion", emotion, EMOTIONS))
                       if code not in known]
            if unknown:
                self.bad(path, f"file name has unknown code(s): {', '.join(unknown)}")
                continue
            if path.stem in seen:
                self.bad(path, f"clip {path.stem} has two files: {seen[path.stem]} and {path}")
                continue
            seen[path.stem] = str(path)
            label = self.label(EMOTIONS[emotion], path)
            if label is None:
                continue
            sex, age = SPEAKERS[speaker]
            yield Sample(
                id=path.stem,
                label=label,
                label_name=self.label_names[label],
                speaker=speaker,
                age=float(age),
                gender=sex,
                text=SENTENCES[text],
                audio_path=str(path),
                source=str(path),
                extra={"emotion": EMOTIONS[emotion], "text_code": text, "take": take, "language": "de"},
            )
        if not found:
            raise DataError(root, "no EmoDB clips found (names like 03a01Fa.wav)",
                            hint="point data.options.root at the folder holding EmoDB's wav/ files")


@hookimpl
def register_datasets():
    return [EmoDBReader]
