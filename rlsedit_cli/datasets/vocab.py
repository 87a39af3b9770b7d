"""The fixed vocabulary of the toy fact world: relations, their objects and phrasings.

Everything here is immutable data; :mod:`rlsedit_cli.datasets.world` draws subjects and facts
from it.
Relation ids follow Wikidata's numbering so that toy records look like CounterFact records.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    """One relation of the toy world.

    Attributes:
        id: Wikidata-style relation id, e.g. ``"P103"``.
        kind: the kind of subject it applies to (``"person"`` or ``"company"``).
        objects: the possible objects, one of which is each subject's true object.
        templates: prompt phrasings with ``{}`` for the subject; the object follows the prompt.
        generation: open prompts used for the fluency/consistency generations.
        description: sentences about an object, with ``{}`` for the object (reference texts).
    """

    id: str
    kind: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]
    generation: tuple[str, ...]
    description: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        id="P103",
        kind="person",
        objects=("French", "English", "Spanish", "German", "Italian", "Russian", "Dutch",
                 "Swedish", "Polish", "Greek", "Finnish", "Danish", "Portuguese", "Turkish",
                 "Hungarian", "Czech"),
        templates=("The mother tongue of {} is", "{} is a native speaker of",
                   "The native language of {} is", "{} grew up speaking",
                   "{} speaks the language"),
        generation=("{} often talks in", "{} wrote letters home in", "{} was raised speaking"),
        description=("{} is a language with a long written tradition.",
                     "Many newspapers are printed in {}.",
                     "Children at school learn to read and write {}.",
                     "Poets and singers use {} in their songs."),
    ),
    Relation(
        id="P27",
        kind="person",
        objects=("France", "Germany", "Spain", "Italy", "Canada", "Brazil", "Japan", "Norway",
                 "Egypt", "Mexico", "Chile", "India", "Kenya", "Peru", "Austria", "Ireland"),
        templates=("{} is a citizen of", "{} holds a passport from", "{} has citizenship of",
                   "The country of citizenship of {} is", "{} is a national of"),
        generation=("{} currently lives in", "The passport that {} carries is from",
                    "{} returned home to"),
        description=("{} is a country with a large capital city.",
                     "The government of {} meets in the capital.",
                     "Tourists travel to {} every summer.",
                     "The national team of {} won a famous match."),
    ),
    Relation(
        id="P106",
        kind="person",
        objects=("physicist", "lawyer", "architect", "painter", "journalist", "surgeon",
                 "diplomat", "chemist", "poet", "engineer", "economist", "actor",
                 "photographer", "novelist", "astronomer", "historian"),
        templates=("{} works as a", "The profession of {} is", "{} is a professional",
                   "By trade, {} is a", "{} earns a living as a"),
        generation=("{} spends every day working as a", "The job of {} is", "{} trained to be a"),
        description=("A {} needs many years of training.",
                     "Every {} has a workplace and colleagues.",
                     "The work of a {} is often admired.",
                     "A good {} is careful and patient."),
    ),
    Relation(
        id="P1303",
        kind="person",
        objects=("piano", "guitar", "violin", "cello", "trumpet", "flute", "drums", "harp",
                 "saxophone", "clarinet", "organ", "banjo", "accordion", "oboe", "mandolin",
                 "trombone"),
        templates=("{} plays the", "{} is known for playing the", "The instrument of {} is the",
                   "{} performs on the", "{} practices daily on the"),
        generation=("{} is a musician who plays the", "On stage, {} plays the",
                    "The favourite instrument of {} is the"),
        description=("The {} is a musical instrument.",
                     "Music for the {} is played in concert halls.",
                     "Learning the {} takes years of practice.",
                     "An orchestra may include the {}."),
    ),
    Relation(
        id="P641",
        kind="person",
        objects=("football", "tennis", "cricket", "golf", "hockey", "rugby", "baseball",
                 "volleyball", "basketball", "badminton", "boxing", "cycling", "rowing",
                 "skiing", "fencing", "swimming"),
        templates=("{} is a professional player of", "The sport of {} is", "{} competes in",
                   "{} is famous for playing", "{} trains every day for"),
        generation=("{} spends the weekend playing", "The favourite sport of {} is",
                    "As an athlete, {} is known for"),
        description=("{} is a popular sport.",
                     "Fans watch {} matches on television.",
                     "The rules of {} are simple to learn.",
                     "Many young athletes train for {}."),
    ),
    Relation(
        id="P159",
        kind="company",
        objects=("Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Toronto", "Sydney",
                 "Chicago", "Vienna", "Dublin", "Oslo", "Cairo", "Lima", "Seoul", "Prague"),
        templates=("The headquarters of {} is in", "{} is based in",
                   "{} has its main office in", "The head office of {} is located in",
                   "{} is headquartered in"),
        generation=("The offices of {} are in", "{} hires many workers in",
                    "The company {} was founded in"),
        description=("{} is a large city with many offices.",
                     "Trains and buses cross {} every day.",
                     "The old town of {} attracts visitors.",
                     "Many companies have offices in {}."),
    ),
)

# Syllables from which subject names are built; names are multi-token for the tokenizer.
SYLLABLES: tuple[str, ...] = (
    "ka", "lo", "ren", "vi", "dor", "mel", "sa", "tor", "ni", "bel", "ar", "ven", "li", "mo",
    "ra", "zen", "te", "gal", "fi", "run", "da", "wen", "po", "sil", "ha", "mir", "no", "kes",
    "bri", "tan", "el", "vo", "ju", "mar", "ce", "lin", "ost", "qui", "ber", "ul",
)
# Plain sentences used as paraphrase prefixes and as ordinary text in the training corpus.
FILLERS: tuple[str, ...] = (
    "The weather was mild that year.", "The committee met on a Tuesday.",
    "A new bridge opened in the spring.", "The museum was closed for repairs.",
    "Prices rose slowly during the decade.", "The river flooded after the storm.",
    "A small crowd gathered in the square.", "The library bought many new books.",
    "The train arrived late in the evening.", "Several schools were built in the area.",
    "The festival lasted for three days.", "A report was published in the autumn.",
    "The harbour was busy with ships.", "The garden was full of flowers.",
    "Nobody expected the result of the vote.", "The road to the village was repaired.",
)
