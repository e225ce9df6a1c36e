"""The teaching lab: backpropagation written by hand (`backprop`), a gradient checker
(`gradcheck`), gradient-descent variants (`descent`) and RNNs through time (`rnn`). Each keeps
its own small loop on purpose: the loop is what it teaches."""
