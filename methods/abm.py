"""ABM: Adversarial Belief Matching (Micaelli & Storkey, 2019), Eqs. 1-3 of the MAD paper.

A generator G maximises the teacher-student KL divergence on its samples while
the student minimises it on fresh samples of G. Everything lives in
:class:`methods.common.AdversarialMethod`; ABM adds nothing to it, which is
the point: DFKD-Mem and MAD are ABM plus one ingredient each.
"""

from dfkd_bench.method_api import register_method
from dfkd_bench.methods.common import AdversarialMethod, AdversarialParams, mad_table2_protocols


@register_method
class ABM(AdversarialMethod):
    name = "abm"
    label = "ABM"
    summary = "ABM (Micaelli & Storkey 2019, as in the MAD paper): the student trains on fresh samples of G only"
    Params = AdversarialParams
    static_student_step = True
    paper_protocols = mad_table2_protocols(AdversarialParams, {"cifar10": 92.38, "cifar100": 62.59})
