"""ttrl: Test-Time Reinforcement Learning — adapt a language model on unlabeled prompts with
rewards from its own majority vote."""

__version__ = "0.1.0"
