# Pair classifier: a siamese ResNet18 embedding, |e1 - e2| and e1 * e2 into a small MLP that outputs one logit
# (same person or not), trained with binary cross-entropy on balanced pairs; reports precision, recall and F1
# on balanced valid pairs every epoch.
#   python train.py configs/pair_classifier.py
image_size = (112, 96)
backbone = "resnet18"
zero_init_residual = True
embedding_dim = 128
loss = "pair_bce"
mining = "none"
pair_hidden_dim = 64
batch_size = 32
optimizer = "adam"
lr = 3e-4
lr_schedule = "cosine"
epochs = 15
