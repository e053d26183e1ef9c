// icmoe_trt: run an IC-MoE TensorRT engine (model.plan) on one image with the TensorRT 10 C++ runtime.
//
//   icmoe_trt MODEL.plan IMAGE.ppm MASK.pgm [--logits LOGITS.f32] [--plugin LIB.so]... [--repeat N]
//
// The engine is the one `python -m export.build` writes on a GPU host (input "image" float32
// (B, 3, S, S) RGB 0..255 with a dynamic batch axis; outputs "logits" float32 (B, 1, S, S),
// "mask" uint8 (B, 1, S, S), "expert" int32 (B,)). The program deserializes it (IRuntime ->
// ICudaEngine -> IExecutionContext), sets the input shape to batch 1, binds device buffers by
// tensor name (setTensorAddress), runs enqueueV3 on a CUDA stream and writes the mask as PGM.
// TensorRT's standard plugins are registered (initLibNvInferPlugins) and --plugin loads more plugin
// libraries, for engines built with custom layers.
//
// NOT COMPILED OR RUN on the machine this was written on (no GPU, no TensorRT headers there); it is
// written against the TensorRT 10 API (NvInfer.h / NvInferRuntime.h).
// Errors: one line "error: ..." on stderr and exit code 1.
#include <NvInfer.h>
#include <NvInferPlugin.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "image_io.h"

namespace {

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "tensorrt: " << msg << "\n";
  }
};

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) { check_cuda(cudaMalloc(&ptr, n), "cudaMalloc"); }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kUINT8: return 1;
    case nvinfer1::DataType::kINT8: return 1;
    case nvinfer1::DataType::kBOOL: return 1;
    case nvinfer1::DataType::kINT64: return 8;
    default: throw std::runtime_error("unsupported tensor data type in the engine");
  }
}

int64_t volume(const nvinfer1::Dims& d) {
  int64_t v = 1;
  for (int32_t i = 0; i < d.nbDims; ++i) {
    if (d.d[i] < 0) throw std::runtime_error("tensor shape still dynamic after setting the input shape");
    v *= d.d[i];
  }
  return v;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

int usage() {
  std::cerr << "usage: icmoe_trt MODEL.plan IMAGE.ppm MASK.pgm [--logits LOGITS.f32] [--plugin LIB.so]... [--repeat N]\n";
  return 2;
}

int run(int argc, char** argv) {
  std::vector<std::string> positional, plugins;
  std::string logits_path;
  int repeat = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--logits" && i + 1 < argc) {
      logits_path = argv[++i];
    } else if (arg == "--plugin" && i + 1 < argc) {
      plugins.push_back(argv[++i]);
    } else if (arg == "--repeat" && i + 1 < argc) {
      repeat = std::atoi(argv[++i]);
    } else if (arg == "-h" || arg == "--help") {
      return usage();
    } else if (!arg.empty() && arg[0] == '-') {
      throw std::runtime_error("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 3) return usage();
  const std::string& plan_path = positional[0];
  const std::string& image_path = positional[1];
  const std::string& mask_path = positional[2];

  const icmoe::Image image = icmoe::read_pnm(image_path);

  std::ifstream file(plan_path, std::ios::binary);
  if (!file) throw std::runtime_error(plan_path + ": cannot open engine");
  const std::vector<char> blob((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (blob.empty()) throw std::runtime_error(plan_path + ": empty engine file");

  Logger logger;
  initLibNvInferPlugins(&logger, "");
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  if (!runtime) throw std::runtime_error("cannot create the TensorRT runtime");
  for (const auto& lib : plugins) {
    if (!runtime->getPluginRegistry().loadLibrary(lib.c_str()))
      throw std::runtime_error(lib + ": TensorRT could not load this plugin library");
  }
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!engine)
    throw std::runtime_error(plan_path + ": TensorRT could not deserialize the engine (damaged, or built by another "
                             "TensorRT version or for another GPU)");
  std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
  if (!context) throw std::runtime_error("cannot create an execution context");

  // The input: "image" (B, 3, S, S) float32; run batch 1 at the engine's size.
  const char* input_name = "image";
  if (engine->getTensorIOMode(input_name) != nvinfer1::TensorIOMode::kINPUT)
    throw std::runtime_error(plan_path + ": engine has no input tensor 'image' (not an IC-MoE engine)");
  if (engine->getTensorDataType(input_name) != nvinfer1::DataType::kFLOAT)
    throw std::runtime_error(plan_path + ": input 'image' is not float32");
  const nvinfer1::Dims in_dims = engine->getTensorShape(input_name);  // (-1, 3, S, S)
  if (in_dims.nbDims != 4 || in_dims.d[1] != 3)
    throw std::runtime_error(plan_path + ": input 'image' is not (B, 3, S, S)");
  const int size = static_cast<int>(in_dims.d[2]);
  if (image.width != size || image.height != size)
    throw std::runtime_error(image_path + ": image is " + std::to_string(image.width) + "x" +
                             std::to_string(image.height) + ", this engine takes " + std::to_string(size) + "x" +
                             std::to_string(size));
  nvinfer1::Dims4 shape(1, 3, size, size);
  if (!context->setInputShape(input_name, shape))
    throw std::runtime_error(plan_path + ": batch 1 is outside the engine's optimization profile");

  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  std::vector<std::unique_ptr<DeviceBuffer>> buffers;
  DeviceBuffer* input = nullptr;
  DeviceBuffer* logits = nullptr;
  DeviceBuffer* mask = nullptr;
  DeviceBuffer* expert = nullptr;
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    const nvinfer1::Dims dims = context->getTensorShape(name);
    const size_t bytes = static_cast<size_t>(volume(dims)) * element_size(engine->getTensorDataType(name));
    buffers.push_back(std::make_unique<DeviceBuffer>(bytes));
    if (!context->setTensorAddress(name, buffers.back()->ptr))
      throw std::runtime_error(std::string("cannot bind tensor ") + name);
    const std::string n = name;
    if (n == "image") input = buffers.back().get();
    if (n == "logits") logits = buffers.back().get();
    if (n == "mask") mask = buffers.back().get();
    if (n == "expert") expert = buffers.back().get();
  }
  if (!input || !logits || !mask || !expert)
    throw std::runtime_error(plan_path + ": engine lacks one of the outputs logits, mask, expert");
  if (engine->getTensorDataType("mask") != nvinfer1::DataType::kUINT8 ||
      engine->getTensorDataType("expert") != nvinfer1::DataType::kINT32 ||
      engine->getTensorDataType("logits") != nvinfer1::DataType::kFLOAT)
    throw std::runtime_error(plan_path + ": outputs are not logits float32, mask uint8, expert int32");
  if (input->bytes != image.chw.size() * sizeof(float)) throw std::runtime_error("input buffer size mismatch");

  check_cuda(cudaMemcpyAsync(input->ptr, image.chw.data(), input->bytes, cudaMemcpyHostToDevice, stream), "copy in");
  if (!context->enqueueV3(stream)) throw std::runtime_error("enqueueV3 failed");
  std::vector<uint8_t> host_mask(mask->bytes);
  std::vector<float> host_logits(logits->bytes / sizeof(float));
  int32_t host_expert = -1;
  check_cuda(cudaMemcpyAsync(host_mask.data(), mask->ptr, mask->bytes, cudaMemcpyDeviceToHost, stream), "copy mask");
  check_cuda(cudaMemcpyAsync(host_logits.data(), logits->ptr, logits->bytes, cudaMemcpyDeviceToHost, stream), "copy logits");
  check_cuda(cudaMemcpyAsync(&host_expert, expert->ptr, sizeof(int32_t), cudaMemcpyDeviceToHost, stream), "copy expert");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

  icmoe::write_pgm(mask_path, host_mask.data(), size, size);
  if (!logits_path.empty()) icmoe::write_raw(logits_path, host_logits.data(), logits->bytes);
  int64_t foreground = 0;
  for (uint8_t v : host_mask) foreground += v != 0;
  std::cout << "expert " << host_expert << "\nforeground " << foreground << " of " << host_mask.size()
            << " pixels\nmask " << mask_path << "\n";

  if (repeat > 0) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeat; ++i) {
      if (!context->enqueueV3(stream)) throw std::runtime_error("enqueueV3 failed");
    }
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::cout << "latency " << ms / repeat << " ms (mean of " << repeat << ", GPU compute only)\n";
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "error: " << first_line(e.what()) << "\n";
  }
  return 1;
}
