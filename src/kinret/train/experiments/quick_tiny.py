"""The notebooks' `quick` experiment made small, for the test suite (`python notebooks/execute.py --small`): the same
margin softmax over training families and 2 folds, on timm's 0.4M-parameter test_resnet at 32 px for 2 epochs, so a
fold trains in seconds. It shows that the notebooks run, not what they show."""
from dataclasses import replace

from kinret.train.experiments import load_experiment

cfg = replace(load_experiment("quick")[0], name="quick_tiny", backbone="test_resnet", input_size=32, epochs=2,
              batch_size=32, eval_pairs=200, threads=1)
