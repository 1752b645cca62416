"""The small documents tests tokenize: two domains ("prose", "code") of repeated text. One definition, so
every test file calibrates on the same kinds of text; the repeat counts set how many windows they give."""

from moeviz.data import Document

FOX = "The quick brown fox jumps over the lazy dog. "
SQUARES = "x = [i * i for i in range(10)]\n"
# Longer sentence and a small function: more distinct tokens per window.
FOX_AND_CAT = "The quick brown fox jumps over the lazy dog while the cat sleeps. "
ADD = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, 2))\n"


def documents(repeat: int = 20) -> list[Document]:
    """A prose and a code document, each its line `repeat` times."""
    return [Document(FOX * repeat, "prose"), Document(SQUARES * repeat, "code")]


def varied_documents(prose_repeat: int = 12, code_repeat: int = 8) -> list[Document]:
    """The longer prose sentence and the small function, repeated."""
    return [Document(FOX_AND_CAT * prose_repeat, "prose"), Document(ADD * code_repeat, "code")]
