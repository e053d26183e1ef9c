// icmoe_trt: run a model's TensorRT engine (model.plan) on one image with the TensorRT 10 C++ runtime.
//
//   icmoe_trt MODEL.plan IMAGE MASK [--logits LOGITS.f32] [--classes NAMES] [--mask-rule RULE] [--plugin LIB.so]...
//             [--repeat N] [--upsample logits|nearest]
//
// The engine is the one `python -m export.build` writes on a GPU host: one input, float32
// (B, 3, S, S) RGB 0..255 with a dynamic batch axis, and the model family's outputs (IC-MoE: logits
// float32 (B, 1, S, S), mask uint8 (B, 1, S, S), expert int32 (B,)). The program deserializes it
// (IRuntime -> ICudaEngine -> IExecutionContext), enumerates the engine's I/O tensors, sets the input
// shape to batch 1, sizes one device buffer per output from the context's tensor shape and the tensor's
// element type, binds them by name (setTensorAddress), runs enqueueV3 on a CUDA stream and then, like
// icmoe_aoti: IMAGE is a PNG, JPEG, BMP or PPM/PGM of any size, resized to the engine's size as the Python
// loaders do (common/image_io.h, common/resize.h); the mask at the image's size is the output named "logits"
// resized bilinearly, then thresholded or arg-maxed as --mask-rule says (threshold, argmax: the build
// manifest's model.mask_rule), or without it (or with --upsample nearest) the output named "mask" resized by
// nearest neighbour, written as PNG (or PGM for a MASK ending in .pgm); --logits writes the output named
// "logits" as raw float32 at the engine's size, every other small output is printed ("expert 2") and so is
// the list of outputs with their types and shapes (common/outputs.h). The mask is binary (0/1, written
// 0/255) unless --classes names its labels (a multi-class model: the label names of the build's manifest,
// `model.classes`, comma-separated, index = value, 0 = background, e.g. --classes background,liver,kidney;
// `python -c "from engines.cpp import class_arguments; print(*class_arguments('BUILD_DIR'))"` prints the
// flags for a build, --mask-rule included); then the mask holds the raw label values and the pixels per label are printed
// ("label1 812 liver"). TensorRT's standard plugins are registered (initLibNvInferPlugins) and --plugin
// loads more plugin libraries, for engines built with custom layers.
//
// NOT COMPILED OR RUN on the machine this was written on (no GPU, no TensorRT headers there); it is
// written against the TensorRT 10 API (NvInfer.h / NvInferRuntime.h).
// Errors: one line "error: ..." on stderr and exit code 1; command-line mistakes exit with 2; --help
// prints the usage to stdout.
#include <NvInfer.h>
#include <NvInferPlugin.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "args.h"
#include "image_io.h"
#include "outputs.h"

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
  // At least one byte: TensorRT wants a non-null address even for an empty tensor.
  explicit DeviceBuffer(size_t n) : bytes(n) { check_cuda(cudaMalloc(&ptr, std::max<size_t>(n, 1)), "cudaMalloc"); }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

struct Stream {
  cudaStream_t stream = nullptr;
  Stream() { check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate"); }
  ~Stream() {
    if (stream) cudaStreamDestroy(stream);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

// NumPy's name of a TensorRT element type (the names of the build manifest's tensor specs);
// icmoe::element_size refuses the ones the program does not handle (FP8, INT4, ...).
std::string dtype_name(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kINT8: return "int8";
    case nvinfer1::DataType::kUINT8: return "uint8";
    case nvinfer1::DataType::kBOOL: return "bool";
    case nvinfer1::DataType::kFP8: return "float8";
    case nvinfer1::DataType::kINT4: return "int4";
    default: return "TensorRT type " + std::to_string(static_cast<int>(t));
  }
}

std::vector<int64_t> dims_vector(const nvinfer1::Dims& d) {
  if (d.nbDims < 0) return {};
  return std::vector<int64_t>(d.d, d.d + d.nbDims);
}

std::string dims_string(const nvinfer1::Dims& d) {
  std::string s = "[";
  for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? "," : "") + std::to_string(d.d[i]);
  return s + "]";
}

struct Binding {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;  // batch 1
  std::unique_ptr<DeviceBuffer> device;
  std::vector<unsigned char> host;
};

icmoe::ArgParser make_parser() {
  icmoe::ArgParser parser("icmoe_trt", {"MODEL.plan", "IMAGE", "MASK"},
                          "Runs a TensorRT engine of python -m export.build on one image (PNG, JPEG, BMP, PPM/PGM;\n"
                          "any size: resized to the engine's) and writes the mask at the image's size (MASK: .png\n"
                          "or .pgm; binary masks 0/255, label maps their label values).");
  icmoe::add_run_options(parser);
  parser.option("--classes", "NAMES",
                "the mask holds labels: their names, comma-separated, background first (the build\n"
                "                        manifest's model.classes); without it the mask is binary (0/1)");
  parser.option("--mask-rule", "RULE",
                "threshold or argmax: how the mask follows from the logits (the build manifest's model.mask_rule)");
  parser.option("--plugin", "LIB.so", "load a TensorRT plugin library (repeatable)", true);
  return parser;
}

// --classes NAMES and --mask-rule RULE -> the mask's kind (binary without --classes, no rule without --mask-rule).
icmoe::MaskKind classes_argument(const icmoe::Arguments& args) {
  icmoe::MaskKind kind;
  try {
    if (args.has("--classes")) kind = icmoe::make_mask_kind("labels", args.get("--classes"));
  } catch (const std::exception& e) {
    throw icmoe::UsageError(std::string("--classes: ") + e.what());
  }
  kind.rule = args.get("--mask-rule");
  try {
    icmoe::check_rule(kind);
  } catch (const std::exception& e) {
    throw icmoe::UsageError(std::string("--mask-rule: ") + e.what());
  }
  return kind;
}

int run(const icmoe::Arguments& parsed) {
  const icmoe::RunArguments args = icmoe::run_arguments(parsed);
  const icmoe::MaskKind kind = classes_argument(parsed);
  const std::vector<std::string> plugins = parsed.all("--plugin");
  const std::string& plan_path = args.model;
  const icmoe::Rgb8 image = icmoe::load_image(args.image, args.limits);

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

  // The engine's I/O tensors, in the engine's order: one input, the outputs in the graph's order.
  std::vector<std::string> inputs, output_names;
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    const nvinfer1::TensorIOMode mode = engine->getTensorIOMode(name);
    if (mode == nvinfer1::TensorIOMode::kINPUT) inputs.push_back(name);
    if (mode == nvinfer1::TensorIOMode::kOUTPUT) output_names.push_back(name);
  }
  if (inputs.size() != 1)
    throw std::runtime_error(plan_path + ": the engine has " + std::to_string(inputs.size()) + " inputs (" +
                             icmoe::join(inputs, ", ") + "); icmoe_trt feeds one image");
  if (output_names.empty()) throw std::runtime_error(plan_path + ": the engine has no outputs");

  // The input: (B, 3, H, W) float32 RGB 0..255; run batch 1 at the engine's size.
  const std::string& input_name = inputs[0];
  if (engine->getTensorDataType(input_name.c_str()) != nvinfer1::DataType::kFLOAT)
    throw std::runtime_error(plan_path + ": input " + input_name + " is " +
                             dtype_name(engine->getTensorDataType(input_name.c_str())) + ", not float32");
  nvinfer1::Dims in_dims = engine->getTensorShape(input_name.c_str());  // (-1, 3, S, S)
  if (in_dims.nbDims != 4 || in_dims.d[1] != 3 || in_dims.d[2] <= 0 || in_dims.d[3] <= 0)
    throw std::runtime_error(plan_path + ": input " + input_name + " is " + dims_string(in_dims) +
                             ", not (B, 3, S, S) with a fixed image size");
  const int height = static_cast<int>(in_dims.d[2]);
  const int width = static_cast<int>(in_dims.d[3]);
  const icmoe::Image input_image = icmoe::model_input(image, width, height);  // (3, H, W) float32 0..255
  in_dims.d[0] = 1;
  if (!context->setInputShape(input_name.c_str(), in_dims))
    throw std::runtime_error(plan_path + ": batch 1 is outside the engine's optimization profile");
  if (!context->allInputDimensionsSpecified())
    throw std::runtime_error(plan_path + ": input shape still unspecified after setting batch 1");

  const size_t input_bytes = input_image.chw.size() * sizeof(float);
  DeviceBuffer input(input_bytes);
  if (!context->setTensorAddress(input_name.c_str(), input.ptr))
    throw std::runtime_error("cannot bind input " + input_name);

  // One device buffer per output, sized from the context's shape (batch 1) and the element type.
  std::vector<Binding> outputs;
  for (const auto& name : output_names) {
    Binding b;
    b.name = name;
    b.dtype = dtype_name(engine->getTensorDataType(name.c_str()));
    const nvinfer1::Dims dims = context->getTensorShape(name.c_str());
    if (dims.nbDims < 0) throw std::runtime_error(plan_path + ": output " + name + " has no shape");
    for (int32_t k = 0; k < dims.nbDims; ++k) {
      if (dims.d[k] < 0)
        throw std::runtime_error(plan_path + ": output " + name + " is " + dims_string(dims) +
                                 " (data-dependent shape) at batch 1");
    }
    b.shape = dims_vector(dims);
    size_t element = 0;
    try {
      element = icmoe::element_size(b.dtype);
    } catch (const std::exception& e) {
      throw std::runtime_error(plan_path + ": output " + name + ": " + e.what());
    }
    const size_t bytes = static_cast<size_t>(icmoe::volume(b.shape)) * element;
    b.device = std::make_unique<DeviceBuffer>(bytes);
    b.host.resize(bytes);
    if (!context->setTensorAddress(name.c_str(), b.device->ptr))
      throw std::runtime_error("cannot bind output " + name);
    outputs.push_back(std::move(b));
  }

  Stream stream;
  check_cuda(cudaMemcpyAsync(input.ptr, input_image.chw.data(), input_bytes, cudaMemcpyHostToDevice, stream.stream),
             "copy image to the GPU");
  if (!context->enqueueV3(stream.stream)) throw std::runtime_error("enqueueV3 failed");
  for (auto& b : outputs) {
    if (b.host.empty()) continue;
    check_cuda(cudaMemcpyAsync(b.host.data(), b.device->ptr, b.host.size(), cudaMemcpyDeviceToHost, stream.stream),
               ("copy output " + b.name + " from the GPU").c_str());
  }
  check_cuda(cudaStreamSynchronize(stream.stream), "cudaStreamSynchronize");

  std::vector<icmoe::Output> views;
  for (const auto& b : outputs) views.push_back(icmoe::Output{b.name, b.dtype, b.shape, b.host.data()});
  icmoe::write_outputs(std::cout, views, height, width, {args.mask, image.width, image.height}, args.logits, kind,
                       args.upsample);

  const int repeat = args.repeat;
  if (repeat > 0) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeat; ++i) {
      if (!context->enqueueV3(stream.stream)) throw std::runtime_error("enqueueV3 failed");
    }
    check_cuda(cudaStreamSynchronize(stream.stream), "cudaStreamSynchronize");
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::cout << "latency " << ms / repeat << " ms (mean of " << repeat << ", GPU compute only)\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const icmoe::ArgParser parser = make_parser();
    icmoe::Arguments args;
    int exit_code = 0;
    if (!icmoe::parse_command_line(parser, argc, argv, args, exit_code)) return exit_code;
    return run(args);
  } catch (const icmoe::UsageError& e) {
    std::cerr << "error: " << icmoe::first_line(e.what()) << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << icmoe::first_line(e.what()) << "\n";
  }
  return 1;
}
