# Siamese network: the small CNN, contrastive loss on balanced same/different pairs drawn afresh each epoch,
# Adam 1e-3, a checkpoint every 5 epochs, architecture / optimiser / parameter counts printed (verbosity 3).
#   python train.py configs/siamese_contrastive.py
# The embeddings are L2-normalised, so pair distances lie in [0, 2]: margin 2.0 keeps every pair of two people
# active (margin 1.0 let the positive term shrink all embeddings into one cap, 80-90 % of negatives inside it).
# 64x56 input: the small CNN's receptive field covers more of the face before its global average pooling, and an
# epoch costs a third of 112x96's, so more steps fit (pairs per epoch are fixed at 2 per training image).
image_size = (64, 56)
backbone = "smallcnn"
head = "mlp"
hidden_dim = 256
embedding_dim = 128
loss = "contrastive"
mining = "none"
margin = 2.0
batch_size = 32
optimizer = "adam"
lr = 1e-3
lr_schedule = "cosine"
epochs = 30
save_every = 5
verbosity = 3
