"""MixGCN's ground: graph data (graph), the WordNet noun graph and synthetic block models
(wordnet, synthetic), the GCN and its PyTorch Geometric import (model), single-process
full-graph training (train), and the mixture-of-parallelism plan against partition
parallelism (plan)."""
