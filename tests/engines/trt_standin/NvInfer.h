// Stand-in for the part of TensorRT 10's C++ API (NvInfer.h / NvInferRuntime.h) that icmoe_trt uses, so the
// program compiles and runs on a machine without TensorRT or a GPU (tests/engines/test_cpp_trt_standin.py).
// It is NOT TensorRT: the "engine" is a fake plan file that lists the I/O tensors and holds canned output
// values, and enqueueV3 copies them into the bound output buffers. Signatures follow TensorRT 10.
//
// Fake plan format: text lines, then the payload (each output's bytes at batch 1, in the listed order):
//
//   ICMOE-FAKE-PLAN
//   input image float32 -1 3 16 16          (-1: the dynamic batch axis)
//   output logits float32 -1 3 16 16
//   output mask uint8 -1 1 16 16
//   output image_sum float32 -1             (computed, no payload: the sum of the input's values)
//   end
//   <payload bytes>
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_runtime_api.h"

namespace nvinfer1 {

using AsciiChar = char;

class ILogger {
 public:
  enum class Severity : int32_t { kINTERNAL_ERROR = 0, kERROR = 1, kWARNING = 2, kINFO = 3, kVERBOSE = 4 };
  virtual void log(Severity severity, AsciiChar const* msg) noexcept = 0;
  virtual ~ILogger() = default;
};

enum class DataType : int32_t { kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3, kBOOL = 4, kUINT8 = 5, kFP8 = 6,
                                kBF16 = 7, kINT64 = 8, kINT4 = 9 };
enum class TensorIOMode : int32_t { kNONE = 0, kINPUT = 1, kOUTPUT = 2 };

struct Dims64 {
  static constexpr int32_t MAX_DIMS{8};
  int32_t nbDims{-1};
  int64_t d[MAX_DIMS]{};
};
using Dims = Dims64;

namespace standin {

struct Tensor {
  std::string name;
  TensorIOMode mode{TensorIOMode::kNONE};
  DataType type{DataType::kFLOAT};
  Dims dims;
  std::vector<unsigned char> payload;  // outputs: the canned values at batch 1
};

inline bool parse_type(const std::string& s, DataType& t) {
  static const std::map<std::string, DataType> types = {
      {"float32", DataType::kFLOAT}, {"float16", DataType::kHALF}, {"bfloat16", DataType::kBF16},
      {"int64", DataType::kINT64},   {"int32", DataType::kINT32},  {"int8", DataType::kINT8},
      {"uint8", DataType::kUINT8},   {"bool", DataType::kBOOL},    {"float8", DataType::kFP8}};
  const auto found = types.find(s);
  if (found == types.end()) return false;
  t = found->second;
  return true;
}

inline size_t type_size(DataType t) {
  switch (t) {
    case DataType::kFLOAT: case DataType::kINT32: return 4;
    case DataType::kHALF: case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    default: return 1;
  }
}

inline int64_t volume(const Dims& d, int64_t batch) {
  int64_t n = 1;
  for (int32_t i = 0; i < d.nbDims; ++i) n *= d.d[i] < 0 ? batch : d.d[i];
  return n;
}

// The plan's tensors, or false for anything that is not a complete fake plan.
inline bool parse_plan(const char* blob, size_t size, std::vector<Tensor>& tensors) {
  const std::string text(blob, size);
  const size_t end = text.find("\nend\n");
  if (text.rfind("ICMOE-FAKE-PLAN\n", 0) != 0 || end == std::string::npos) return false;
  std::istringstream lines(text.substr(16, end - 16 + 1));
  std::string line;
  size_t offset = end + 5;
  while (std::getline(lines, line)) {
    std::istringstream in(line);
    Tensor t;
    std::string mode, type;
    if (!(in >> mode >> t.name >> type) || !parse_type(type, t.type)) return false;
    t.mode = mode == "input" ? TensorIOMode::kINPUT : TensorIOMode::kOUTPUT;
    t.dims.nbDims = 0;
    for (int64_t v; t.dims.nbDims < Dims::MAX_DIMS && in >> v;) t.dims.d[t.dims.nbDims++] = v;
    if (t.mode == TensorIOMode::kOUTPUT && t.name != "image_sum") {
      const size_t bytes = static_cast<size_t>(volume(t.dims, 1)) * type_size(t.type);
      if (offset + bytes > size) return false;  // truncated payload
      t.payload.assign(blob + offset, blob + offset + bytes);
      offset += bytes;
    }
    tensors.push_back(std::move(t));
  }
  return offset == size;
}

}  // namespace standin

class IExecutionContext {
 public:
  explicit IExecutionContext(const std::vector<standin::Tensor>& tensors) : tensors_(tensors) {}
  virtual ~IExecutionContext() = default;

  bool setInputShape(char const* name, Dims const& dims) {
    const standin::Tensor* t = find(name);
    if (!t || t->mode != TensorIOMode::kINPUT || dims.nbDims != t->dims.nbDims || dims.d[0] != 1) return false;
    batch_ = dims.d[0];
    return true;
  }
  bool allInputDimensionsSpecified() const { return batch_ > 0; }
  bool setTensorAddress(char const* name, void* data) {
    if (!find(name) || !data) return false;
    addresses_[name] = data;
    return true;
  }
  Dims getTensorShape(char const* name) const {
    const standin::Tensor* t = find(name);
    Dims d = t ? t->dims : Dims{};
    for (int32_t i = 0; i < d.nbDims; ++i)
      if (d.d[i] < 0 && batch_ > 0) d.d[i] = batch_;
    return d;
  }
  bool enqueueV3(cudaStream_t) {
    const float* image = nullptr;
    int64_t pixels = 0;
    for (const auto& t : tensors_) {
      if (!addresses_.count(t.name)) return false;
      if (t.mode == TensorIOMode::kINPUT) image = static_cast<const float*>(addresses_[t.name]);
      if (t.mode == TensorIOMode::kINPUT) pixels = standin::volume(t.dims, batch_);
    }
    for (const auto& t : tensors_) {
      if (t.mode != TensorIOMode::kOUTPUT) continue;
      if (t.name == "image_sum") {
        double sum = 0;
        for (int64_t i = 0; i < pixels; ++i) sum += image[i];
        const float value = static_cast<float>(sum);
        std::memcpy(addresses_[t.name], &value, sizeof(value));
      } else {
        std::memcpy(addresses_[t.name], t.payload.data(), t.payload.size());
      }
    }
    return true;
  }

 private:
  const standin::Tensor* find(char const* name) const {
    for (const auto& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }
  const std::vector<standin::Tensor>& tensors_;
  std::map<std::string, void*> addresses_;
  int64_t batch_{0};
};

class ICudaEngine {
 public:
  explicit ICudaEngine(std::vector<standin::Tensor> tensors) : tensors_(std::move(tensors)) {}
  virtual ~ICudaEngine() = default;

  int32_t getNbIOTensors() const noexcept { return static_cast<int32_t>(tensors_.size()); }
  char const* getIOTensorName(int32_t index) const noexcept { return tensors_[index].name.c_str(); }
  TensorIOMode getTensorIOMode(char const* name) const noexcept { return find(name).mode; }
  DataType getTensorDataType(char const* name) const noexcept { return find(name).type; }
  Dims getTensorShape(char const* name) const noexcept { return find(name).dims; }
  IExecutionContext* createExecutionContext() noexcept { return new IExecutionContext(tensors_); }

 private:
  const standin::Tensor& find(char const* name) const {
    for (const auto& t : tensors_)
      if (t.name == name) return t;
    return tensors_.front();
  }
  std::vector<standin::Tensor> tensors_;
};

class IPluginRegistry {
 public:
  using PluginLibraryHandle = void*;
  PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept { return nullptr; }  // no plugins here
};

class IRuntime {
 public:
  virtual ~IRuntime() = default;
  ICudaEngine* deserializeCudaEngine(void const* blob, std::size_t size) noexcept {
    std::vector<standin::Tensor> tensors;
    if (!standin::parse_plan(static_cast<const char*>(blob), size, tensors) || tensors.empty()) return nullptr;
    return new ICudaEngine(std::move(tensors));
  }
  IPluginRegistry& getPluginRegistry() noexcept { return registry_; }

 private:
  IPluginRegistry registry_;
};

inline IRuntime* createInferRuntime(ILogger&) noexcept { return new IRuntime; }

}  // namespace nvinfer1
