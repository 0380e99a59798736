// 2-D convolutions for XLA on CPU, computed by oneDNN, as XLA FFI custom calls.
//
// XLA runs a CPU convolution on one thread; oneDNN's JIT kernels use every core. Three
// handlers, all NHWC activations and HWIO kernels in float32, stride 1, no dilation, one
// group, explicit (top, bottom, left, right) padding:
//   JrConvForward          x [N,H,W,C], w [KH,KW,C,O]  -> y [N,OH,OW,O]
//   JrConvBackwardData     dy [N,OH,OW,O], w           -> dx [N,H,W,C]
//   JrConvBackwardWeights  x, dy                       -> dw [KH,KW,C,O]
//   JrConvReluPool         x, w, bias [O]              -> 2x2 max-pool(relu(conv + bias))
//                                                         [N,OH/2,OW/2,O], inference only
// Activations stay in XLA's NHWC (oneDNN's brgemm kernels take it directly: no reorder of
// the large tensors); oneDNN picks the kernel's layout, and a kernel or result in any other
// layout is reordered. Built against oneDNN 2.x (Debian's libdnnl-dev) by
// jaxretrieval/ops/conv.py.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
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

// What the primitives are asked for: NHWC activations (an implementation that wants
// another layout there is slower than one that reads NHWC, measured), any kernel layout
// (fixing HWIO too leaves only the slow im2col + GEMM implementation).
memory::desc Src(const Shapes& s) { return Nhwc(s.n, s.c, s.h, s.w); }
memory::desc Dst(const Shapes& s) { return Nhwc(s.n, s.o, s.oh, s.ow); }
memory::desc Weights(const Shapes& s) {
  return memory::desc({s.o, s.c, s.kh, s.kw}, memory::data_type::f32, memory::format_tag::any);
}

// XLA may run independent custom calls at the same time: each execution brings its own
// scratchpad instead of sharing the library's.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The forward primitive descriptor, also the hint both backward ones need.
dnnl::convolution_forward::primitive_desc ForwardDesc(const Shapes& s) {
  dnnl::convolution_forward::desc desc(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Src(s),
      Weights(s), Dst(s), {1, 1}, {s.pad_top, s.pad_left}, {s.pad_bottom, s.pad_right});
  return dnnl::convolution_forward::primitive_desc(desc, UserScratchpad(), CpuEngine());
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

std::string Key(const char* kind, const Shapes& s) {
  std::string key(kind);
  for (int64_t v : {s.n, s.h, s.w, s.c, s.kh, s.kw, s.o, s.pad_top, s.pad_bottom, s.pad_left,
                    s.pad_right}) {
    key += ',' + std::to_string(v);
  }
  return key;
}

// Primitives are built once per shape (building one JIT-compiles its kernel).
template <typename T = Compiled, typename Make>
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

// `data` in XLA's layout `given`, as memory in the layout the primitive wants.
memory Into(const memory::desc& wanted, const memory::desc& given, void* data,
            dnnl::stream& stream) {
  memory user(given, CpuEngine(), data);
  if (wanted == given) return user;
  memory converted(wanted, CpuEngine());
  dnnl::reorder(user, converted).execute(stream, user, converted);
  return converted;
}

void Run(const Compiled& c, const memory::desc& a_given, void* a, const memory::desc& b_given,
         void* b, const memory::desc& out_given, void* out) {
  dnnl::stream stream(CpuEngine());
  memory result(out_given, CpuEngine(), out);
  memory computed = c.out == out_given ? result : memory(c.out, CpuEngine());
  c.primitive.execute(stream, {{c.arg_a, Into(c.a, a_given, a, stream)},
                               {c.arg_b, Into(c.b, b_given, b, stream)},
                               {c.arg_out, computed},
                               {DNNL_ARG_SCRATCHPAD, memory(c.scratchpad, CpuEngine())}});
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

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t pt, int64_t pb, int64_t pl,
                   int64_t pr) {
  Shapes s = ShapesOf(x.dimensions(), w.dimensions(), y->dimensions(), pt, pb, pl, pr);
  if (auto error = CheckShapes(s); error.failure()) return error;
  Compiled c = Cached(Key("forward", s), [&] {
    return Compile(ForwardDesc(s), DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST);
  });
  Run(c, Nhwc(s.n, s.c, s.h, s.w), x.typed_data(), Hwio(s), w.typed_data(),
      Nhwc(s.n, s.o, s.oh, s.ow), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t pt, int64_t pb, int64_t pl,
                        int64_t pr) {
  Shapes s = ShapesOf(dx->dimensions(), w.dimensions(), dy.dimensions(), pt, pb, pl, pr);
  if (auto error = CheckShapes(s); error.failure()) return error;
  Compiled c = Cached(Key("backward_data", s), [&] {
    dnnl::convolution_backward_data::desc desc(
        dnnl::algorithm::convolution_direct, Src(s), Weights(s), Dst(s), {1, 1},
        {s.pad_top, s.pad_left}, {s.pad_bottom, s.pad_right});
    dnnl::convolution_backward_data::primitive_desc pd(desc, UserScratchpad(), CpuEngine(),
                                                        ForwardDesc(s));
    return Compile(pd, DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC);
  });
  Run(c, Nhwc(s.n, s.o, s.oh, s.ow), dy.typed_data(), Hwio(s), w.typed_data(),
      Nhwc(s.n, s.c, s.h, s.w), dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr) {
  Shapes s = ShapesOf(x.dimensions(), dw->dimensions(), dy.dimensions(), pt, pb, pl, pr);
  if (auto error = CheckShapes(s); error.failure()) return error;
  Compiled c = Cached(Key("backward_weights", s), [&] {
    dnnl::convolution_backward_weights::desc desc(
        dnnl::algorithm::convolution_direct, Src(s), Weights(s), Dst(s), {1, 1},
        {s.pad_top, s.pad_left}, {s.pad_bottom, s.pad_right});
    dnnl::convolution_backward_weights::primitive_desc pd(desc, UserScratchpad(), CpuEngine(),
                                                           ForwardDesc(s));
    return Compile(pd, DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS);
  });
  Run(c, Nhwc(s.n, s.c, s.h, s.w), x.typed_data(), Nhwc(s.n, s.o, s.oh, s.ow),
      dy.typed_data(), Hwio(s), dw->typed_data());
  return ffi::Error::Success();
}

// Memory this thread keeps between calls: a fresh allocation each call would be faulted
// in and zeroed page by page again (jaxretrieval/host_memory.py).
struct ThreadBuffer {
  std::unique_ptr<char, decltype(&std::free)> data{nullptr, &std::free};
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes > size) {
      size = (bytes + 4095) / 4096 * 4096;
      data.reset(static_cast<char*>(std::aligned_alloc(4096, size)));
      if (!data) throw dnnl::error(dnnl_out_of_memory, "no memory for a scratch buffer");
    }
    return data.get();
  }
};

struct FusedCompiled {
  dnnl::primitive conv, pool;
  memory::desc src, weights, activations, scratchpad, pooled;
};

// The convolution with bias and ReLU (a post-op), for one image: Winograd F(4x4, 3x3)
// where oneDNN has it and the channels fill its 16-wide blocks (2.2-2.4x faster than
// direct on the seed CNN's second and third convolutions, on oneDNN's blocked layouts;
// 2.8x slower on the 3-channel stem), else the direct one that reads and writes NHWC.
dnnl::convolution_forward::primitive_desc FusedConvDesc(const Shapes& s, bool winograd) {
  dnnl::post_ops relu;
  relu.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr = UserScratchpad();
  attr.set_post_ops(relu);
  memory::desc bias({s.o}, memory::data_type::f32, memory::format_tag::a);
  auto any = [](memory::desc md) {
    return memory::desc(md.dims(), memory::data_type::f32, memory::format_tag::any);
  };
  if (winograd && s.c % 16 == 0 && s.o % 16 == 0) {
    try {
      dnnl::convolution_forward::desc desc(
          dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_winograd,
          any(Src(s)), Weights(s), bias, any(Dst(s)), {1, 1}, {s.pad_top, s.pad_left},
          {s.pad_bottom, s.pad_right});
      return dnnl::convolution_forward::primitive_desc(desc, attr, CpuEngine());
    } catch (const dnnl::error&) {
      // No Winograd kernel for this shape or machine (e.g. 3 input channels).
    }
  }
  dnnl::convolution_forward::desc desc(
      dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, Src(s),
      Weights(s), bias, Dst(s), {1, 1}, {s.pad_top, s.pad_left}, {s.pad_bottom, s.pad_right});
  return dnnl::convolution_forward::primitive_desc(desc, attr, CpuEngine());
}

// Inference: for one image at a time, convolution, bias and ReLU into this thread's
// buffer, then oneDNN's 2x2 max-pool from it into XLA's result. The pre-pool activations
// stay in cache and never become an XLA buffer (4x less written); layout changes happen
// per image, in cache too.
ffi::Error ConvReluPool(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr, bool winograd) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  Shapes s{1, xd[1], xd[2], xd[3], wd[0], wd[1], wd[3],
           xd[1] + pt + pb - wd[0] + 1, xd[2] + pl + pr - wd[1] + 1, pt, pb, pl, pr};
  const int64_t n = xd[0], ph = s.oh / 2, pw = s.ow / 2;
  if (s.oh < 2 || s.ow < 2 || yd[0] != n || yd[1] != ph || yd[2] != pw || yd[3] != s.o ||
      bias.dimensions()[0] != s.o) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxretrieval oneDNN conv-relu-pool: shapes and padding disagree");
  }
  std::string key = Key(winograd ? "conv_relu_pool_winograd" : "conv_relu_pool", s);
  FusedCompiled c = Cached<FusedCompiled>(key, [&] {
    auto conv = FusedConvDesc(s, winograd);
    // Pooled in the convolution's own layout; an odd last row or column is dropped
    // (right padding -1 makes oneDNN's size check agree).
    memory::desc pooled(Nhwc(1, s.o, ph, pw).dims(), memory::data_type::f32,
                        memory::format_tag::any);
    dnnl::pooling_forward::desc pool_desc(
        dnnl::prop_kind::forward_inference, dnnl::algorithm::pooling_max, conv.dst_desc(),
        pooled, {2, 2}, {2, 2}, {0, 0}, {s.oh % 2 ? -1 : 0, s.ow % 2 ? -1 : 0});
    dnnl::pooling_forward::primitive_desc pool(pool_desc, CpuEngine());
    return FusedCompiled{dnnl::primitive(conv), dnnl::primitive(pool), conv.src_desc(),
                         conv.weights_desc(), conv.dst_desc(), conv.scratchpad_desc(),
                         pool.dst_desc()};
  });
  thread_local ThreadBuffer src_buffer, weights_buffer, activations, pooled_buffer, scratchpad;
  dnnl::stream stream(CpuEngine());
  memory given_weights(Hwio(s), CpuEngine(), w.typed_data());
  memory weights(c.weights, CpuEngine(), weights_buffer.Get(c.weights.get_size()));
  dnnl::reorder(given_weights, weights).execute(stream, given_weights, weights);
  memory bias_memory(memory::desc({s.o}, memory::data_type::f32, memory::format_tag::a),
                     CpuEngine(), bias.typed_data());
  memory act(c.activations, CpuEngine(), activations.Get(c.activations.get_size()));
  memory pad(c.scratchpad, CpuEngine(), scratchpad.Get(c.scratchpad.get_size()));
  const memory::desc image_in = Src(s), image_out = Nhwc(1, s.o, ph, pw);
  const bool reorder_in = !(c.src == image_in), reorder_out = !(c.pooled == image_out);
  memory src_blocked(c.src, CpuEngine(), reorder_in ? src_buffer.Get(c.src.get_size()) : nullptr);
  memory out_blocked(c.pooled, CpuEngine(),
                     reorder_out ? pooled_buffer.Get(c.pooled.get_size()) : nullptr);
  const int64_t in_size = s.h * s.w * s.c, out_size = ph * pw * s.o;
  for (int64_t i = 0; i < n; ++i) {
    memory src(image_in, CpuEngine(), x.typed_data() + i * in_size);
    memory dst(image_out, CpuEngine(), y->typed_data() + i * out_size);
    if (reorder_in) dnnl::reorder(src, src_blocked).execute(stream, src, src_blocked);
    c.conv.execute(stream, {{DNNL_ARG_SRC, reorder_in ? src_blocked : src},
                            {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_BIAS, bias_memory},
                            {DNNL_ARG_DST, act}, {DNNL_ARG_SCRATCHPAD, pad}});
    c.pool.execute(stream, {{DNNL_ARG_SRC, act}, {DNNL_ARG_DST, reorder_out ? out_blocked : dst}});
    if (reorder_out) dnnl::reorder(out_blocked, dst).execute(stream, out_blocked, dst);
  }
  stream.wait();
  return ffi::Error::Success();
}

// oneDNN throws on bad descriptors; XLA needs an Error, never an exception across its ABI.
// `threads`: the cores this call may use. With one XLA CPU device per core, each device's
// thread runs its own convolutions on one core instead of all of them contending.
template <ffi::Error (*Impl)(ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                             ffi::ResultBuffer<ffi::F32>, int64_t, int64_t, int64_t, int64_t)>
ffi::Error Guarded(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> out, int64_t pad_top, int64_t pad_bottom,
                   int64_t pad_left, int64_t pad_right, int64_t threads) {
  omp_set_num_threads(static_cast<int>(threads));  // this calling thread's setting only
  try {
    return Impl(a, b, out, pad_top, pad_bottom, pad_left, pad_right);
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jaxretrieval oneDNN convolution: ") + e.what());
  }
}

ffi::Error GuardedConvReluPool(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                               ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                               int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                               int64_t pad_right, int64_t threads, bool winograd) {
  omp_set_num_threads(static_cast<int>(threads));
  try {
    return ConvReluPool(x, w, bias, y, pad_top, pad_bottom, pad_left, pad_right, winograd);
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jaxretrieval oneDNN conv-relu-pool: ") + e.what());
  }
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right")
      .Attr<int64_t>("threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JrConvForward, Guarded<Forward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JrConvBackwardData, Guarded<BackwardData>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JrConvBackwardWeights, Guarded<BackwardWeights>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JrConvReluPool, GuardedConvReluPool,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("winograd"));
