"""The built-in task families; importing this module registers them."""

from tracetune.synth.programs import receipts  # noqa: F401
from tracetune.synth.programs import tables  # noqa: F401
from tracetune.synth.programs import charts  # noqa: F401
from tracetune.synth.programs import documents  # noqa: F401
from tracetune.synth.programs import forms  # noqa: F401
from tracetune.synth.programs import faces  # noqa: F401
from tracetune.synth.programs import compare  # noqa: F401
from tracetune.synth.programs import retrieval  # noqa: F401
