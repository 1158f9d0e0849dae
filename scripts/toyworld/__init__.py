"""The toy world: a tiny SD1.5-layout base model pretrained by us, and a judge to measure what it draws.

Dev/demo tooling (not part of the shipped pack): the main job and the tests use it as the embedded
default, so a LoRA can be trained and its effect measured on a CPU with nothing downloaded.
"""

VERSION = 2
