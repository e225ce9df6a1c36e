"""Training: the train state and compiled steps (`steps`), the optimizer (`optim`), devices
(`parallel`), checkpoints (`checkpoint`), transfer learning (`transfer`), the loop's stages
(`loop`), callbacks (`callbacks`), many seeds (`sweep`) and loading a finished run (`runs`).
Imports `cnnjax.data`, `cnnjax.nn` and `cnnjax.report`, never `cnnjax.visualize`."""
