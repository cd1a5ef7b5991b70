"""Defaults shared by every config; each config file overrides what its setting needs."""

import ml_collections


def get_default_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    # jax's persistent compilation cache, which spares a relaunch (a resubmitted job, a resumed
    # run) the compilation: 'auto' = <workdir>/compilation_cache on GPU and TPU and none on CPU,
    # '' = none, otherwise a directory (runs of one config may share it).
    config.compilation_cache_dir = 'auto'

    config.data = data = ml_collections.ConfigDict()
    data.dataset = 'cifar10'  # digits | mnist | cifar10 | folder | afhq | ffhq | lsun_church
    # image folder (folder, afhq, ffhq, lsun_church) or tfds data_dir ('' = tfds's default);
    # local or gs://
    data.data_dir = ''
    data.test_dir = ''  # image folder of the test split (image-folder data sets), for --mode=eval
    data.image_size = 32
    data.num_channels = 3
    data.random_flip = False
    data.cache_mb = 4096  # image folders: prepared images kept in memory, per process (MiB)
    # Image folders of a conditional model (model.num_classes > 0): the class names, the sorted
    # first-level subfolders of data_dir, written here by the first training run so that later
    # runs map labels to the same names; () = read them from data_dir.
    data.classes = ()

    config.model = model = ml_collections.ConfigDict()
    # The forward process (ihdm_jax/processes.py): 'heat' (this paper), 'heat_continuous' (the
    # heat process at continuous levels, its network estimating u_0: any number of steps), or a
    # Gaussian process
    # diagonal in the DCT basis with ε-prediction (ihdm_jax/diffusion.py): 'ddpm' (Ho et al.
    # 2020), 'blurring' (Hoogeboom & Salimans 2022), 'non_isotropic' (Voleti et al.).
    model.process = 'heat'
    model.K = (
        200  # levels of the process: the heat levels; T (ddpm, non_isotropic); blurring's grid
    )
    model.sigma = 0.01  # training noise σ (Eq. 4)
    model.blur_sigma_min = 0.5
    model.blur_sigma_max = 24.0  # the largest blur σ: heat σ_B,K; blurring σ_B at t = 1 (H. & S.)
    model.beta_min = 1e-4  # ddpm, non_isotropic: β_1 of the linear schedule (Ho et al., Sec. 4)
    model.beta_max = 0.02  # ddpm, non_isotropic: β_T
    model.blur_d_min = 0.001  # blurring: d_min of the blurring factor d_t(λ)
    model.noise_gamma = 1.0  # non_isotropic: c(λ) ∝ (λ + c0)^(−γ/2)
    model.noise_c0 = 1.0  # non_isotropic: c0
    model.model_channels = 128
    # Groups of every GroupNorm (32: the original code's). A residual block adds the time
    # embedding as one constant per channel before its second GroupNorm, so with one channel
    # per group the network cannot depend on the level at all (docs/processes.md).
    model.num_groups = 32
    model.channel_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attention_levels = (2, 3)  # U-Net levels (0 = full resolution) with self-attention
    model.dropout = 0.1
    # U-Net resampling. 'conv': strided 3x3 conv down, nearest up then 3x3 conv (the original code,
    # which made the paper's numbers). 'avgpool': 2x2 average pooling down, nearest up, no conv on
    # either side (the paper's text; the original code's conv_resample=False).
    model.downsample = 'conv'
    model.dtype = 'float32'  # U-Net compute dtype: 'float32' | 'bfloat16' (params stay float32)
    model.ema_rate = 0.999
    # Classes of a class-conditional model (docs/conditional.md): the data set's labels (digits,
    # MNIST, CIFAR-10: 10; an image folder: its subfolders); 0 = unconditional (the paper's).
    model.num_classes = 0

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 400_000
    training.snapshot_freq = 10_000
    training.log_freq = 100
    training.sampling_freq = 10_000
    training.max_to_keep = 3  # the newest checkpoints kept
    training.keep_period = 0  # also keep every checkpoint whose step is a multiple of it; 0 = none
    # Conditional models: the probability that a training label is replaced by the null class
    # (classifier-free guidance's p_uncond; Ho & Salimans found 0.1-0.2 best).
    training.label_dropout = 0.1

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.delta = 0.0125  # sampling noise δ (Eq. 8)
    # The sampler (ihdm_jax/samplers.py): 'ancestral', Alg. 2 for the heat process and Ho et
    # al.'s ancestral sampler for the diffusion processes; 'ddim', Song et al.'s DDIM with
    # η = eta in [0, 1] (0: deterministic, for the heat process its probability-flow ODE).
    sampling.sampler = 'ancestral'
    sampling.eta = 0.0
    # Steps of the sampler; 0 = all K levels. Fewer steps skip levels: any number for
    # heat_continuous and blurring; a divisor of K for ddpm, non_isotropic and the paper's heat
    # process (there Alg. 2 alone, on every (K/steps)-th level: docs/sampling.md measures it).
    sampling.steps = 0
    sampling.num_samples = 64
    sampling.batch_size = 64
    # Conditional models: the class of each sample, repeated in turn; () = every class in turn;
    # -1 = none (the null class, and for the heat process the prior over all training images).
    sampling.labels = ()
    # Conditional models: the guidance weight w of μ̃ = μ(∅) + w (μ(c) − μ(∅)) (ε for the
    # diffusion processes): 1 = conditional, 0 = unconditional, > 1 guided towards the class.
    sampling.guidance = 1.0

    config.evaluation = evaluation = ml_collections.ConfigDict()  # --mode=eval, fid, sweep_delta
    evaluation.batch_size = 256  # ELBO batch (split over devices) and Inception batch
    evaluation.num_examples = 0  # test examples in the ELBO; 0 = the whole test split
    evaluation.num_passes = 4  # Monte-Carlo passes over the test examples, one level k each
    evaluation.train_chunk = 10_000  # training images held at once for the L_K bound
    evaluation.fid_num_samples = 50_000  # the paper's count (10k at 256x256)
    # The images of FID's reference statistics: 'train' (config.data's training split), 'test'
    # (its test split) or a folder of image files (prepared as the folder data sets, data.py).
    # The paper (App. B.3): the training set for CIFAR-10 and LSUN, the entire data set for
    # AFHQ and FFHQ ('train', 'test'). Splits in the same folder are read once.
    evaluation.fid_reference = ('train',)
    # A file of the reference statistics (keys mu, sigma); '' = <workdir>/eval/, named after
    # the reference: train_stats_<dataset>_<size>.npz for ('train',), otherwise
    # reference_stats_<dataset>_<size>_<entries joined by +>.npz (a folder as <name>-<hash>).
    evaluation.fid_train_stats = ''
    evaluation.inception_weights = ''  # '' = $IHDM_INCEPTION_WEIGHTS, else the default cache file
    evaluation.deltas = (0.01, 0.0125, 0.01325, 0.015, 0.0175)  # --mode=sweep_delta
    # --mode=sweep_delta also over these sampler steps (each a config.sampling.steps); () = the
    # config's steps alone.
    evaluation.sweep_steps = ()

    config.analysis = analysis = ml_collections.ConfigDict()  # same_init, psd, ... (README.md)
    # Rows of the pictures: prior draws (same_init, delta_grid), noise sequences (share_noise),
    # endpoint pairs (interpolate), samples (nearest_neighbours), chains (trajectory_gradients).
    analysis.num_rows = 8
    analysis.num_columns = 8  # samples per row (same_init, share_noise)
    analysis.num_points = 8  # interpolate: frames per pair, both endpoints included
    analysis.num_trees = 4  # hierarchical: prior draws, each the root of a tree
    analysis.split_fractions = (0.75, 0.5, 0.25)  # hierarchical: split levels, fractions of K
    analysis.branches = 2  # hierarchical: copies of each chain at every split
    # psd, input_gradients and trajectory_gradients: levels k as fractions of K (rounded, at
    # least 1).
    analysis.level_fractions = (0.02, 0.1, 0.25, 0.5, 1.0)
    analysis.num_images = 256  # psd: training images averaged
    # input_gradients: output pixels (row, column) as fractions of the image size, channel 0.
    analysis.gradient_pixels = ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.5))
    # input_gradients, trajectory_gradients: linear range of the symlog colours (the paper: 0.1
    # for Fig. 8 left, 0.01 for Fig. 8 right, 0.002 for Fig. 13).
    analysis.gradient_linthresh = 0.01
    analysis.blur_sigma_maxes = (1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0)  # prior_overlap (Fig. 12)
    analysis.num_neighbours = 5  # nearest_neighbours: training images shown per sample
    # delta_grid (Fig. 6): the δ of its columns. Not evaluation.deltas: the figure needs δ = 0
    # (the chain only sharpens its start), which the ELBO of sweep_delta cannot take, and a
    # range from there to noisy samples, wider than the sweep around the best FID.
    analysis.deltas = (0.0, 0.005, 0.01, 0.0125, 0.015, 0.02, 0.03)

    config.restore = restore = ml_collections.ConfigDict()  # --mode=restore (restoration.py)
    # The degraded images: a folder of image files, an .npz with `images` (uint8 NHWC) or one
    # image file; local or gs://. `reference`: the same images undegraded, in the same form,
    # optional (PSNR and SSIM, and a column of the grid).
    restore.input = ''
    restore.reference = ''
    # What degraded them: a Gaussian blur of blur_sigma pixels (deblurring), or the mean over
    # blocks of upsample x upsample pixels (super-resolution by that factor); one of the two.
    restore.blur_sigma = 0.0
    restore.upsample = 1
    restore.noise = 0.0  # standard deviation of measurement noise per pixel, at most model.sigma
    restore.num_samples = 8  # restorations of each input; their mean is written too
    restore.consistency = True  # the measured frequencies replaced after every step

    return config
