// Torch binding of the W2A8 kernel: module bitdistill._C, function packed_linear.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>


#include "w2a8_gemv.h"

namespace {

using bitdistill::DType;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "packed_linear_cuda: x must be float32, bfloat16 or float16, got ", t);
  }
}

int sm_count(int device) {
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess, "packed_linear_cuda: cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  return n;
}

bool has_pdl(int device) {
  int major = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  TORCH_CHECK(err == cudaSuccess, "packed_linear_cuda: cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  return major >= 9;
}

long long round16(long long n) { return (n + 15) / 16 * 16; }

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

at::Tensor packed_linear(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& weight_scale,
                         const c10::optional<at::Tensor>& bias_in, const c10::optional<at::Tensor>& out, int64_t config,
                         int64_t splits, bool pdl, bool fuse) {
  TORCH_CHECK(x_in.is_cuda() && packed_in.is_cuda() && weight_scale.is_cuda(),
              "packed_linear_cuda: x, packed and weight_scale must be CUDA tensors");
  TORCH_CHECK(x_in.dim() == 2, "packed_linear_cuda: x must be 2-D [M, K], got ", x_in.sizes());
  TORCH_CHECK(packed_in.dim() == 2 && packed_in.scalar_type() == at::kByte,
              "packed_linear_cuda: packed must be uint8 [N/4, K], got ", packed_in.scalar_type(), " ",
              packed_in.sizes());
  TORCH_CHECK(packed_in.size(1) == x_in.size(1), "packed_linear_cuda: x has K=", x_in.size(1),
              " columns but packed has in_features=", packed_in.size(1));
  TORCH_CHECK(weight_scale.numel() == 1, "packed_linear_cuda: weight_scale must hold one value, got shape ",
              weight_scale.sizes());
  TORCH_CHECK(x_in.get_device() == packed_in.get_device() && x_in.get_device() == weight_scale.get_device(),
              "packed_linear_cuda: x, packed and weight_scale must be on the same device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = packed_in.size(0) * 4;

  at::Tensor x = x_in.contiguous();
  if (!aligned16(x)) x = x.clone();
  at::Tensor packed = packed_in.contiguous();
  if (!aligned16(packed)) packed = packed.clone();
  const at::Tensor wscale = weight_scale.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = *bias_in;
    TORCH_CHECK(bias.is_cuda() && bias.get_device() == x.get_device(), "packed_linear_cuda: bias must be on x's device");
    TORCH_CHECK(bias.numel() == N, "packed_linear_cuda: bias has ", bias.numel(), " elements, expected out_features=", N);
    if (bias.scalar_type() != at::kFloat && bias.scalar_type() != x.scalar_type()) bias = bias.to(at::kFloat);
    bias = bias.contiguous();
  }
  at::Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    TORCH_CHECK(y.is_cuda() && y.get_device() == x.get_device() && y.scalar_type() == x.scalar_type() &&
                    y.dim() == 2 && y.size(0) == M && y.size(1) == N && y.is_contiguous(),
                "packed_linear_cuda: out must be a contiguous [", M, ", ", N, "] ", x.scalar_type(),
                " tensor on x's device");
  } else {
    y = at::empty({M, N}, x.options());
  }
  if (M == 0 || N == 0) return y;

  bitdistill::W2A8Args args;
  args.x = x.data_ptr();
  args.packed = packed.data_ptr<uint8_t>();
  args.weight_scale = wscale.data_ptr<float>();
  args.bias = bias.defined() ? bias.data_ptr() : nullptr;
  args.y = y.data_ptr();
  TORCH_CHECK(M < (1LL << 31) / 16 && N < (1LL << 31) && K < (1LL << 31), "packed_linear_cuda: shape too large");
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(N);
  args.K = static_cast<int>(K);
  args.dtype = to_dtype(x.scalar_type());
  args.bias_dtype = bias.defined() ? to_dtype(bias.scalar_type()) : DType::kFloat32;
  args.config = static_cast<int>(config);
  args.splits = static_cast<int>(splits);
  args.fuse = fuse;
  const char* problem = bitdistill::w2a8_check(args);
  TORCH_CHECK(problem == nullptr, "packed_linear_cuda: ", problem ? problem : "");

  const int device = x.get_device();
  const int sms = sm_count(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  // One scratch allocation per call from torch's caching allocator (graph-capture safe): x codes,
  // s_x, split-K workspace (zeroed by the quantization kernel).
  const bitdistill::W2A8Scratch need = bitdistill::w2a8_scratch_sizes(args, sms);
  const long long scale_off = round16(need.codes_bytes);
  const long long ws_off = scale_off + round16(need.scale_floats * 4);
  at::Tensor scratch = at::empty({ws_off + need.workspace_ints * 4}, x.options().dtype(at::kByte));
  uint8_t* base = scratch.data_ptr<uint8_t>();
  args.x_codes = reinterpret_cast<int8_t*>(base);
  args.x_scale = reinterpret_cast<float*>(base + scale_off);
  args.workspace = need.workspace_ints > 0 ? reinterpret_cast<int*>(base + ws_off) : nullptr;
  const cudaError_t err = bitdistill::w2a8_launch(args, sms, pdl && has_pdl(device), stream);
  TORCH_CHECK(err == cudaSuccess, "packed_linear_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

std::tuple<at::Tensor, at::Tensor> activation_quant(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 2, "activation_quant_cuda: x must be a 2-D CUDA tensor, got ",
              x_in.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  TORCH_CHECK(K % 4 == 0 && K >= 4, "activation_quant_cuda: in_features must be a positive multiple of 4, got ", K);
  TORCH_CHECK(M >= 1 && M < (1LL << 31) && K < (1LL << 30), "activation_quant_cuda: unsupported shape ", x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  if (!aligned16(x)) x = x.clone();
  const int kp = bitdistill::w2a8_padded_k(static_cast<int>(K));
  at::Tensor codes = at::empty({M, kp}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, 1}, x.options().dtype(at::kFloat));
  const cudaError_t err = bitdistill::act_quant_launch(
      x.data_ptr(), to_dtype(x.scalar_type()), static_cast<int>(M), static_cast<int>(K), codes.data_ptr<int8_t>(),
      scale.data_ptr<float>(), c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "activation_quant_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return {codes.narrow(1, 0, K), scale};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bitdistill CUDA kernels (W2A8 packed ternary GEMV/GEMM)";
  m.def("packed_linear", &packed_linear, "y[M, N] = W2A8 packed linear (see csrc/w2a8_gemv.h)", py::arg("x"),
        py::arg("packed"), py::arg("weight_scale"), py::arg("bias") = py::none(), py::arg("out") = py::none(), py::arg("config") = -1,
        py::arg("splits") = -1, py::arg("pdl") = true, py::arg("fuse") = false);
  m.def("activation_quant", &activation_quant, "(int8 codes [M, K], float32 scale [M, 1]) per-token absmax", py::arg("x"));
  m.attr("num_configs") = bitdistill::kNumConfigs;
}
