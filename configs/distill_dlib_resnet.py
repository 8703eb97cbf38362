# dlib's own network, read into torch (--init_from=dlib_resnet), fine-tuned to the faces as this repository aligns
# them: the aligned LFW DevTrain training people (configs/lfw_cpu.py's split, people held out whole), each photo
# and its mirror given dlib's descriptor of it (dlib finds the face again and cuts its own chip; the cache of
# distill_lfw_cpu.py), the network fed the repository's 112x112 crops at dlib's 150x150. Read as it is, the
# network scores 88 % on such crops, dlib's whole method 98.78 %: its chips are cut otherwise. Its embeddings are
# learnt as they are (no centring: they are the network's own), at a small learning rate, since the network
# already knows faces; half the photos in grayscale as in distill_lfw_cpu.py. Results: docs/results.md,
# "dlib's network in torch".
#   python train.py configs/distill_dlib_resnet.py
#   python test.py --checkpoint=out/distill_dlib_resnet/tb_model.pth --data_dir=data/lfw/unseen
data_dir = "data/lfw"
out_dir = "out/distill_dlib_resnet"
teacher = "dlib"
teacher_cache = "data/teacher_cache"
loss = "none"
distill_loss = "cosine"
distill_centre = False
backbone = "dlib_resnet"
init_from = "dlib_resnet"
head = "linear"
image_size = 150
grayscale = 0.5
embedding_dim = 128
batch_size = 128
optimizer = "adamw"
lr = 1e-4
weight_decay = 1e-4
lr_schedule = "onecycle"
epochs = 10
select_on = "pairs"
