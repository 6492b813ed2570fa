// Shared pieces of the tokenskip TensorRT plugins: namespace/version, the logger handed over by
// TensorRT (setLoggerFinder), attribute reading, and a base class that wires the three IPluginV3One
// capability interfaces together.
#pragma once

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernel_types.h"

namespace tokenskip {
namespace plugin {

constexpr char const* kNamespace = "tokenskip";
constexpr char const* kVersion = "1";

// Logs through the ILogger that TensorRT passed to setLoggerFinder (silently dropped before).
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logError(std::string const& msg) noexcept;
void logWarning(std::string const& msg) noexcept;
void logInfo(std::string const& msg) noexcept;

// Output-to-input aliasing switch (default off) and a count of the aliases granted to TensorRT.
// TensorRT-RTX 1.7 queries getAliasedInput even without PreviewFeature::kALIASED_PLUGIN_IO_10_03 and
// then refuses the build, and a plugin cannot see the builder config: whoever turns the preview
// feature on also turns this on (tokenskip.plugins.aliasing), so plain builds keep the copy path.
void setAliasedIo(bool on) noexcept;
bool aliasedIo() noexcept;
void countAliasGranted() noexcept;
int64_t aliasesGranted() noexcept;

// An integer attribute by name from a plugin field collection (INT32/INT64/INT16/INT8 fields).
// Returns false (and logs the plugin + attribute) when it is missing or not an integer.
bool readIntField(nvinfer1::PluginFieldCollection const* fc, char const* plugin, char const* name, int64_t& value) noexcept;

// DataType -> kernel element / index kinds; false if unsupported.
bool toElemKind(nvinfer1::DataType t, ElemKind& out) noexcept;
bool toIndexKind(nvinfer1::DataType t, IndexKind& out) noexcept;
bool isHiddenType(nvinfer1::DataType t) noexcept;

// IPluginV3OneBuildV2 (output-to-input aliasing, PreviewFeature::kALIASED_PLUGIN_IO_10_03) exists
// from TensorRT 10.3 on; older headers give the plain build interface and ScatterTokens copies.
#if defined(NV_TENSORRT_MAJOR) && (NV_TENSORRT_MAJOR > 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR >= 3))
#define TOKENSKIP_HAS_ALIASED_IO 1
using BuildV2 = nvinfer1::IPluginV3OneBuildV2;
#else
#define TOKENSKIP_HAS_ALIASED_IO 0
using BuildV2 = nvinfer1::IPluginV3OneBuild;
#endif

// Implements the capability plumbing and the no-op hooks common to both plugins. `Build` is the
// build capability interface the plugin offers (IPluginV3OneBuild, or BuildV2 for aliasing).
template <class Build>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public Build,
                   public nvinfer1::IPluginV3OneRuntime {
public:
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
        switch (type) {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<Build*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const*, int32_t, nvinfer1::PluginTensorDesc const*,
                          int32_t) noexcept override {
        return 0;
    }
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }
};

// Field list holder for getFieldsToSerialize / getFieldNames (pointers into this object).
class Fields {
public:
    void set(std::vector<nvinfer1::PluginField> fields) {
        mFields = std::move(fields);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }
    nvinfer1::PluginFieldCollection const* get() const { return &mCollection; }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

} // namespace plugin
} // namespace tokenskip
