# The field's standard large-scale face recipe (insightface arcface_torch's IResNet-50 on MS1MV3): 112x112 aligned
# faces, IResNet-50 with its FC-BN 512-d embedding layer, ArcFace with scale 64 and margin 0.5 in arcface_torch's
# form, SGD at 0.1 with polynomial decay to 0, weight decay 5e-4, mixed precision (train.py's CUDA default), 20
# epochs, 128 images per GPU in P x K batches of 32 people x 4 photos, the 93,431 ArcFace centres sharded over the
# GPUs (PartialFC at sample rate 1, as insightface trains MS1MV3: the full softmax). insightface's faces_emore
# folder (train.rec and lfw.bin, cfp_fp.bin, agedb_30.bin beside it) or aligned identity folders (prepare.py align),
# on GPUs under torchrun:
#   torchrun --standalone --nproc_per_node=8 train.py configs/ms1m_iresnet50.py --data_dir=data/faces_emore \
#       --val_bins=lfw,cfp_fp,agedb_30
# Its speed on one GPU is measured in docs/results.md; its accuracy on the field's training sets is not (none was
# at hand).
data_dir = "data/ms1mv3"
backbone = "iresnet50"
zero_init_residual = False
head = "fc_bn"
embedding_dim = 512
image_size = 112
loss = "arcface"
arcface_scale = 64.0
arcface_margin = 0.5
arcface_form = "arcface_torch"  # the gradient of cos(theta), no fallback past pi: what insightface trains MS1MV3 with
partial_fc = 1.0
batch_size = 128
images_per_identity = 4
optimizer = "sgd"
lr = 0.1
weight_decay = 5e-4
lr_schedule = "poly"
epochs = 20
