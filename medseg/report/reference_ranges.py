"""Adult organ volume reference ranges (mL) per label name, for flagging implausible segmentations.

The limits are **approximate, rounded and deliberately wide**: they are medseg's flagging limits, chosen to
enclose the normal adult volumes the studies below report, not values quoted from them, and not diagnostic
thresholds (organomegaly or atrophy is a radiologist's call). A volume outside its range says "look at this
case": most often a segmentation failure (an organ half-found, leaking into a neighbour, or cut off by the
field of view), sometimes real anatomy. They are data: pass your own mapping to
:class:`medseg.report.qa.QAConfig` (``ranges=``) to tighten, widen, add or remove organs.

==========  ================  =====================================================================================
label       range (mL)        sources
==========  ================  =====================================================================================
liver       1000 – 2500       Vauthey J-N, Abdalla EK, Doherty DA et al. Body surface area and body weight predict
                              total liver volume in Western adults. *Liver Transpl* 2002;8(3):233–240 (CT
                              volumetry, 292 adults); Heinemann A, Wischhusen F, Püschel K, Rogiers X. Standard
                              liver volume in the Caucasian population. *Liver Transpl Surg* 1999;5(5):366–368
                              (autopsy series).
spleen      100 – 400         Prassopoulos P, Daskalogiannaki M, Raissaki M, Hatjidakis A, Gourtsoyiannis N.
                              Determination of normal splenic volume on computed tomography in relation to age,
                              gender and body habitus. *Eur Radiol* 1997;7(2):246–248.
kidney      80 – 300 each     Emamian SA, Nielsen MB, Pedersen JF, Ytte L. Kidney dimensions at sonography:
(one side)                    correlation with age, sex, and habitus in 665 adult volunteers. *AJR Am J
                              Roentgenol* 1993;160(1):83–86; Cheong B, Muthupillai R, Rubin MF, Flamm SD. Normal
                              values for renal length and volume as measured by magnetic resonance imaging.
                              *Clin J Am Soc Nephrol* 2007;2(1):38–45. (Ultrasound ellipsoid volumes run lower
                              than MRI/CT volumetry; the range spans both.)
kidneys     160 – 600         the same, for one label holding both kidneys (``kidney`` / ``kidneys`` without a
(both)                        side, as in KiTS or MSD-style label maps).
pancreas    30 – 130          Saisho Y, Butler AE, Meier JJ et al. Pancreas volumes in humans from birth to age
                              one hundred taking into account sex, obesity, and presence of type-2 diabetes.
                              *Clin Anat* 2007;20(8):933–942 (adult plateau, and the decline after ~60 years).
==========  ================  =====================================================================================

Structures whose segmented volume depends mostly on the field of view or on physiology (aorta and other
vessels, bowel, stomach, gallbladder, bladder, lungs) have no range: only the other QA rules apply to them.

Names are matched like :func:`medseg.export.codes.lookup` matches them (case, separators, ``kidney_L`` /
``Right Kidney`` / ``KidneyRight``; aliases such as ``kidneys``): :func:`reference_range`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from medseg.export.names import ALIASES, normalise_name


@dataclass(frozen=True)
class ReferenceRange:
    """A plausible adult volume range ``[low_ml, high_ml]`` and where it comes from (shown on the review page)."""

    low_ml: float
    high_ml: float
    source: str

    def __post_init__(self) -> None:
        if not 0 <= self.low_ml < self.high_ml:
            raise ValueError(f"reference range needs 0 <= low < high, got {self.low_ml}–{self.high_ml} mL")

    def contains(self, volume_ml: float) -> bool:
        """Whether ``volume_ml`` lies inside the range (limits included)."""
        return self.low_ml <= volume_ml <= self.high_ml


_LIVER = (
    "Vauthey et al., Liver Transpl 2002;8(3):233-240 (CT volumetry, 292 Western adults); "
    "Heinemann et al., Liver Transpl Surg 1999;5(5):366-368 (standard liver volume, autopsy series)"
)
_SPLEEN = "Prassopoulos et al., Eur Radiol 1997;7(2):246-248 (normal splenic volume on CT)"
_KIDNEY = (
    "Emamian et al., AJR Am J Roentgenol 1993;160(1):83-86 (sonography, 665 adults); "
    "Cheong et al., Clin J Am Soc Nephrol 2007;2(1):38-45 (MRI)"
)
_PANCREAS = "Saisho et al., Clin Anat 2007;20(8):933-942 (pancreas volumes from birth to age 100)"

#: Default ranges by normalised organ name (:func:`medseg.export.names.normalise_name`). ``kidney`` is one
#: kidney (a label with a side); ``kidneys`` a label holding both.
DEFAULT_RANGES: dict[str, ReferenceRange] = {
    "liver": ReferenceRange(1000.0, 2500.0, _LIVER),
    "spleen": ReferenceRange(100.0, 400.0, _SPLEEN),
    "kidney": ReferenceRange(80.0, 300.0, _KIDNEY + "; per kidney"),
    "kidneys": ReferenceRange(160.0, 600.0, _KIDNEY + "; both kidneys in one label"),
    "pancreas": ReferenceRange(30.0, 130.0, _PANCREAS),
}

_SIDES = {"left", "right", "l", "r", "lt", "rt"}
#: An organ name without a side that means both of a pair.
_BOTH = {"kidney": "kidneys"}


def reference_range(
    name: str, ranges: Mapping[str, ReferenceRange] = DEFAULT_RANGES
) -> ReferenceRange | None:
    """The range for a label name, or None when the table has none.

    The whole normalised name is tried first (so a table may hold ``"kidney left"`` itself); then the organ
    without its side (``kidney_right`` → ``kidney``, per kidney), then its alias (``kidneys`` → ``kidney``:
    without a side, the both-kidneys entry).

    Example:
        >>> reference_range("Kidney_L").high_ml, reference_range("kidneys").high_ml
        (300.0, 600.0)
    """
    table = {normalise_name(k): v for k, v in ranges.items()}
    key = normalise_name(name)
    words = key.split()
    sided = len(words) > 1 and (words[0] in _SIDES or words[-1] in _SIDES)
    if key in table and (sided or key not in _BOTH):
        return table[key]
    if sided:
        words = words[1:] if words[0] in _SIDES else words[:-1]
    base = " ".join(words)
    base = ALIASES.get(base, base)
    if not sided:
        base = _BOTH.get(base, base)
    return table.get(base)
