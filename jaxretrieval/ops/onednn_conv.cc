// 2-D convolutions for XLA on CPU, computed by oneDNN, as XLA FFI custom calls.
//
// XLA runs a CPU convolution on one thread; oneDNN's JIT kernels use every core. Four
// handlers, all NHWC activations and HWIO kernels in float32, stride 1, no dilation, one
// group, explicit (top, bottom, left, right) padding:
//   JrConvForward          x [N,H,W,C], w [KH,KW,C,O]  -> y [N,OH,OW,O]
//   JrConvBackwardData     dy [N,OH,OW,O], w           -> dx [N,H,W,C]
//   JrConvBackwardWeights  x, dy                       -> dw [KH,KW,C,O]
//   JrConvReluPool         x, w, bias [O]              -> 2x2 max-pool(relu(conv + bias))
//                                                         [N,OH/2,OW/2,O], inference only
// Each takes `threads` (the cores this call may use) and `winograd` (whether oneDNN's
// Winograd F(4x4, 3x3) convolution may be used). Built against oneDNN 3.x from PyPI by
// jaxretrieval/ops/conv.py; JrOnednnVersion says which oneDNN was loaded.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::algorithm;
using dnnl::memory;

namespace {

struct Shapes {
  int64_t n, h, w, c, kh, kw, o, oh, ow;
  int64_t pad_top, pad_bottom, pad_left, pad_right;
};

dnnl::engine& CpuEngine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The layouts XLA hands over and expects back.
memory::desc Nhwc(int64_t n, int64_t c, int64_t h, int64_t w) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, memory::format_tag::nhwc);
}
memory::desc Hwio(const Shapes& s) {
  return memory::desc({s.o, s.c, s.kh, s.kw}, memory::data_type::f32, memory::format_tag::hwio);
}
memory::desc Bias(const Shapes& s) {
  return memory::desc({s.o}, memory::data_type::f32, memory::format_tag::a);
}
memory::desc Any(const memory::desc& md) {
  return memory::desc(md.get_dims(), memory::data_type::f32, memory::format_tag::any);
}

// What the primitives are asked for. Direct convolution: NHWC activations (its brgemm
// kernels read and write them; an implementation that wants another layout there is
// slower) and any kernel layout (fixing HWIO too leaves only im2col + GEMM).
// Winograd: every layout left to oneDNN (it has only blocked ones); reorders included, it
// is faster on the seed CNN's 32- and 64-channel convolutions (bench/conv.py).
memory::desc Src(const Shapes& s, algorithm a) {
  memory::desc nhwc = Nhwc(s.n, s.c, s.h, s.w);
  return a == algorithm::convolution_winograd ? Any(nhwc) : nhwc;
}
memory::desc Dst(const Shapes& s, algorithm a) {
  memory::desc nhwc = Nhwc(s.n, s.o, s.oh, s.ow);
  return a == algorithm::convolution_winograd ? Any(nhwc) : nhwc;
}
memory::desc Weights(const Shapes& s) { return Any(Hwio(s)); }

// Winograd where allowed, oneDNN has a kernel for the shape and machine, the channels
// fill its 16-wide blocks (on the 3-channel stem it is slower than direct), and the
// call has enough output pixels to pay for transforming the kernel, which oneDNN does on
// every call; else direct. oneDNN implements Winograd for AVX-512 CPUs only: elsewhere
// building its primitive descriptor throws "unimplemented", and the direct convolution
// is used instead. `make` builds the primitive descriptor(s) for one algorithm.
constexpr int64_t kWinogradMinPixels = 8192;

template <typename Make>
auto WithAlgorithm(const Shapes& s, bool winograd, int64_t images, Make make) {
  if (winograd && s.c % 16 == 0 && s.o % 16 == 0 &&
      images * s.oh * s.ow >= kWinogradMinPixels) {
    try {
      return make(algorithm::convolution_winograd);
    } catch (const dnnl::error& e) {
      // No Winograd kernel for this shape or CPU: the direct convolution below.
      if (e.status != dnnl_unimplemented) throw;
    }
  }
  return make(algorithm::convolution_direct);
}

// XLA may run independent custom calls at the same time: each execution brings its own
// scratchpad instead of sharing the library's.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The training forward primitive descriptor, also the hint both backward ones need.
dnnl::convolution_forward::primitive_desc ForwardDesc(const Shapes& s, algorithm a) {
  return dnnl::convolution_forward::primitive_desc(
      CpuEngine(), dnnl::prop_kind::forward_training, a, Src(s, a), Weights(s), Dst(s, a),
      {1, 1}, {s.pad_top, s.pad_left}, {s.pad_bottom, s.pad_right}, UserScratchpad());
}

// A primitive and the layouts it wants for its two inputs and its output.
struct Compiled {
  dnnl::primitive primitive;
  int arg_a, arg_b, arg_out;
  memory::desc a, b, out, scratchpad;
};

template <typename PrimitiveDesc>
Compiled Compile(const PrimitiveDesc& pd, int arg_a, int arg_b, int arg_out) {
  auto layout = [&](int arg) { return pd.query_md(dnnl::query::exec_arg_md, arg); };
  return Compiled{dnnl::primitive(pd), arg_a, arg_b, arg_out, layout(arg_a), layout(arg_b),
                  layout(arg_out), pd.scratchpad_desc()};
}

std::string Key(const char* kind, const Shapes& s, bool winograd) {
  std::string key(kind);
  for (int64_t v : {s.n, s.h, s.w, s.c, s.kh, s.kw, s.o, s.pad_top, s.pad_bottom, s.pad_left,
                    s.pad_right, static_cast<int64_t>(winograd)}) {
    key += ',' + std::to_string(v);
  }
  return key;
}

// Primitives are built once per shape (building one JIT-compiles its kernel).
template <typename T, typename Make>
T Cached(const std::string& key, Make make) {
  static std::mutex mutex;
  static std::unordered_map<std::string, T> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  T made = make();
  cache.emplace(key, made);
  return made;
}

// Memory a thread keeps between calls: a fresh allocation each call would be faulted in
// and zeroed page by page again (jaxretrieval/host_memory.py).
struct ThreadBuffer {
  std::unique_ptr<char, decltype(&std::free)> data{nullptr, &std::free};
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes > size) {
      size_t rounded = (bytes + 4095) / 4096 * 4096;
      data.reset(static_cast<char*>(std::aligned_alloc(4096, rounded)));
      if (!data) throw dnnl::error(dnnl_out_of_memory, "no memory for a scratch buffer");
      size = rounded;
    }
    return data.get();
  }
};

// `data` in XLA's layout `given`, as memory in the layout the primitive wants (converted
// into `buffer` when they differ).
memory Into(const memory::desc& wanted, const memory::desc& given, void* data,
            ThreadBuffer& buffer, dnnl::stream& stream) {
  memory user(given, CpuEngine(), data);
  if (wanted == given) return user;
  memory converted(wanted, CpuEngine(), buffer.Get(wanted.get_size()));
  dnnl::reorder(user, converted).execute(stream, user, converted);
  return converted;
}

void Run(const Compiled& c, const memory::desc& a_given, void* a, const memory::desc& b_given,
         void* b, const memory::desc& out_given, void* out) {
  thread_local ThreadBuffer a_buffer, b_buffer, out_buffer, scratchpad;
  dnnl::stream stream(CpuEngine());
  memory result(out_given, CpuEngine(), out);
  memory computed = c.out == out_given
                        ? result
                        : memory(c.out, CpuEngine(), out_buffer.Get(c.out.get_size()));
  c.primitive.execute(
      stream, {{c.arg_a, Into(c.a, a_given, a, a_buffer, stream)},
               {c.arg_b, Into(c.b, b_given, b, b_buffer, stream)},
               {c.arg_out, computed},
               {DNNL_ARG_SCRATCHPAD,
                memory(c.scratchpad, CpuEngine(), scratchpad.Get(c.scratchpad.get_size()))}});
  if (!(c.out == out_given)) dnnl::reorder(computed, result).execute(stream, computed, result);
  stream.wait();
}

ffi::Error CheckShapes(const Shapes& s) {
  if (s.oh != s.h + s.pad_top + s.pad_bottom - s.kh + 1 ||
      s.ow != s.w + s.pad_left + s.pad_right - s.kw + 1 || s.oh < 1 || s.ow < 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxretrieval oneDNN convolution: shapes and padding disagree");
  }
  return ffi::Error::Success();
}

Shapes ShapesOf(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                ffi::Span<const int64_t> y, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Shapes{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], pt, pb, pl, pr};
}

// oneDNN throws on bad descriptors; XLA needs an Error, never an exception across its ABI.
// `threads`: with one XLA CPU device per core, each device's thread runs its own
// convolutions on one core instead of all of them contending. Only an OpenMP build of
// oneDNN takes a per-thread count; a TBB build shares its one pool among the callers.
template <typename Body>
ffi::Error Protected(int64_t threads, Body body) {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  omp_set_num_threads(static_cast<int>(threads));  // this calling thread's setting only
#else
  (void)threads;
#endif
  try {
    return body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jaxretrieval oneDNN convolution: ") + e.what());
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t pt, int64_t pb, int64_t pl,
                   int64_t pr, int64_t threads, bool winograd) {
  Shapes s = ShapesOf(x.dimensions(), w.dimensions(), y->dimensions(), pt, pb, pl, pr);
  if (auto error = CheckShapes(s); error.failure()) return error;
  return Protected(threads, [&] {
    Compiled c = Cached<Compiled>(Key("forward", s, winograd), [&] {
      return WithAlgorithm(s, winograd, s.n, [&](algorithm a) {
        return Compile(ForwardDesc(s, a), DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST);
      });
    });
    Run(c, Nhwc(s.n, s.c, s.h, s.w), x.typed_data(), Hwio(s), w.typed_data(),
        Nhwc(s.n, s.o, s.oh, s.ow), y->typed_data());
    return ffi::Error::Success();
  });
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t pt, int64_t pb, int64_t pl,
                        int64_t pr, int64_t threads, bool winograd) {
  Shapes s = ShapesOf(dx->dimensions(), w.dimensions(), dy.dimensions(), pt, pb, pl, pr);
  if (auto error = CheckShapes(s); error.failure()) return error;
  return Protected(threads, [&] {
    Compiled c = Cached<Compiled>(Key("backward_data", s, winograd), [&] {
      return WithAlgorithm(s, winograd, s.n, [&](algorithm a) {
        dnnl::convolution_backward_data::primitive_desc pd(
            CpuEngine(), a, Src(s, a), Weights(s), Dst(s, a), {1, 1}, {s.pad_top, s.pad_left},
            {s.pad_bottom, s.pad_right}, ForwardDesc(s, a), UserScratchpad());
        return Compile(pd, DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC);
      });
    });
    Run(c, Nhwc(s.n, s.o, s.oh, s.ow), dy.typed_data(), Hwio(s), w.typed_data(),
        Nhwc(s.n, s.c, s.h, s.w), dx->typed_data());
    return ffi::Error::Success();
  });
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr, int64_t threads, bool winograd) {
  Shapes s = ShapesOf(x.dimensions(), dw->dimensions(), dy.dimensions(), pt, pb, pl, pr);
  if (auto error = CheckShapes(s); error.failure()) return error;
  return Protected(threads, [&] {
    Compiled c = Cached<Compiled>(Key("backward_weights", s, winograd), [&] {
      return WithAlgorithm(s, winograd, s.n, [&](algorithm a) {
        dnnl::convolution_backward_weights::primitive_desc pd(
            CpuEngine(), a, Src(s, a), Weights(s), Dst(s, a), {1, 1}, {s.pad_top, s.pad_left},
            {s.pad_bottom, s.pad_right}, ForwardDesc(s, a), UserScratchpad());
        return Compile(pd, DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS);
      });
    });
    Run(c, Nhwc(s.n, s.c, s.h, s.w), x.typed_data(), Nhwc(s.n, s.o, s.oh, s.ow),
        dy.typed_data(), Hwio(s), dw->typed_data());
    return ffi::Error::Success();
  });
}

struct FusedCompiled {
  dnnl::primitive conv, pool;
  memory::desc src, weights, activations, scratchpad, pooled;
};

// Inference: for one image at a time, convolution, bias and ReLU (a post-op) into this
// thread's buffer, then oneDNN's 2x2 max-pool from it into XLA's result. The pre-pool
// activations stay in cache and never become an XLA buffer (4x less written); layout
// changes happen per image, in cache too.
ffi::Error ConvReluPool(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr, int64_t threads, bool winograd) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  Shapes s{1, xd[1], xd[2], xd[3], wd[0], wd[1], wd[3],
           xd[1] + pt + pb - wd[0] + 1, xd[2] + pl + pr - wd[1] + 1, pt, pb, pl, pr};
  const int64_t n = xd[0], ph = s.oh / 2, pw = s.ow / 2;
  if (s.oh < 2 || s.ow < 2 || yd[0] != n || yd[1] != ph || yd[2] != pw || yd[3] != s.o ||
      bias.dimensions()[0] != s.o) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxretrieval oneDNN conv-relu-pool: shapes and padding disagree");
  }
  return Protected(threads, [&] {
    Shapes whole_call = s;  // the key holds the batch: Winograd or not depends on it
    whole_call.n = n;
    FusedCompiled c = Cached<FusedCompiled>(Key("conv_relu_pool", whole_call, winograd), [&] {
      dnnl::post_ops relu;
      relu.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
      dnnl::primitive_attr attr = UserScratchpad();
      attr.set_post_ops(relu);
      auto conv = WithAlgorithm(s, winograd, n, [&](algorithm a) {
        return dnnl::convolution_forward::primitive_desc(
            CpuEngine(), dnnl::prop_kind::forward_inference, a, Src(s, a), Weights(s),
            Bias(s), Dst(s, a), {1, 1}, {s.pad_top, s.pad_left}, {s.pad_bottom, s.pad_right},
            attr);
      });
      // Pooled in the convolution's own layout; an odd last row or column is dropped
      // (right padding -1 makes oneDNN's size check agree; dilation 0 is none).
      dnnl::pooling_forward::primitive_desc pool(
          CpuEngine(), dnnl::prop_kind::forward_inference, algorithm::pooling_max,
          conv.dst_desc(), Any(Nhwc(1, s.o, ph, pw)), {2, 2}, {2, 2}, {0, 0}, {0, 0},
          {s.oh % 2 ? -1 : 0, s.ow % 2 ? -1 : 0});
      return FusedCompiled{dnnl::primitive(conv), dnnl::primitive(pool), conv.src_desc(),
                           conv.weights_desc(), conv.dst_desc(), conv.scratchpad_desc(),
                           pool.dst_desc()};
    });
    thread_local ThreadBuffer src_buffer, weights_buffer, activations, pooled_buffer, scratch;
    dnnl::stream stream(CpuEngine());
    memory weights = Into(c.weights, Hwio(s), w.typed_data(), weights_buffer, stream);
    memory bias_memory(Bias(s), CpuEngine(), bias.typed_data());
    memory act(c.activations, CpuEngine(), activations.Get(c.activations.get_size()));
    memory pad(c.scratchpad, CpuEngine(), scratch.Get(c.scratchpad.get_size()));
    const memory::desc image_in = Nhwc(1, s.c, s.h, s.w), image_out = Nhwc(1, s.o, ph, pw);
    const bool reorder_out = !(c.pooled == image_out);
    memory out_blocked(c.pooled, CpuEngine(),
                       reorder_out ? pooled_buffer.Get(c.pooled.get_size()) : nullptr);
    const int64_t in_size = s.h * s.w * s.c, out_size = ph * pw * s.o;
    for (int64_t i = 0; i < n; ++i) {
      memory src = Into(c.src, image_in, x.typed_data() + i * in_size, src_buffer, stream);
      memory dst(image_out, CpuEngine(), y->typed_data() + i * out_size);
      c.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                              {DNNL_ARG_BIAS, bias_memory}, {DNNL_ARG_DST, act},
                              {DNNL_ARG_SCRATCHPAD, pad}});
      c.pool.execute(stream,
                     {{DNNL_ARG_SRC, act}, {DNNL_ARG_DST, reorder_out ? out_blocked : dst}});
      if (reorder_out) dnnl::reorder(out_blocked, dst).execute(stream, out_blocked, dst);
    }
    stream.wait();
    return ffi::Error::Success();
  });
}

// Operands, result, then the attributes every handler takes.
template <typename Binding>
auto WithAttributes(Binding binding) {
  return std::move(binding).template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right")
      .template Attr<int64_t>("threads")
      .template Attr<bool>("winograd");
}

auto TwoOperands() {
  return WithAttributes(ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>());
}

}  // namespace

// The loaded oneDNN's version, "major.minor.patch", for the log line that says which
// convolution a run uses.
extern "C" const char* JrOnednnVersion() {
  static const std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  }();
  return version.c_str();
}

// Empty if oneDNN can make its CPU engine here, else why not (a SYCL build of oneDNN
// needs a SYCL CPU device), checked before any convolution is sent to it.
extern "C" const char* JrOnednnEngineError() {
  static const std::string error = []() -> std::string {
    // The caller reports a failure in its own words: no oneDNN error lines on stdout,
    // unless the user asked for oneDNN's verbose output.
    if (!std::getenv("ONEDNN_VERBOSE") && !std::getenv("DNNL_VERBOSE")) dnnl::set_verbose(0);
    try {
      CpuEngine();
      return "";
    } catch (const dnnl::error& e) {
      return e.what();
    }
  }();
  return error.c_str();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JrConvForward, Forward, TwoOperands());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JrConvBackwardData, BackwardData, TwoOperands());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JrConvBackwardWeights, BackwardWeights, TwoOperands());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JrConvReluPool, ConvReluPool,
                              WithAttributes(ffi::Ffi::Bind()
                                                 .Arg<ffi::Buffer<ffi::F32>>()
                                                 .Arg<ffi::Buffer<ffi::F32>>()
                                                 .Arg<ffi::Buffer<ffi::F32>>()));
