"""Lightning callbacks that add ITA / IEL and continual evaluation to a Lightning project."""

from lightning_taylor.callbacks.baselines import LinearProbe, SequentialFineTuning
from lightning_taylor.callbacks.continual_evaluation import ContinualEvaluation
from lightning_taylor.callbacks.fault_tolerance import FaultTolerance
from lightning_taylor.callbacks.second_order import IEL, ITA, SecondOrder
from lightning_taylor.head.pretuning import PreTuning

__all__ = ["ContinualEvaluation", "FaultTolerance", "IEL", "ITA", "LinearProbe", "PreTuning", "SecondOrder", "SequentialFineTuning"]
