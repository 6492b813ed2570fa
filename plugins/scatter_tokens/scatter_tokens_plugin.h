// TensorRT IPluginV3 for tokenskip::ScatterTokens (see README.md in this folder and docs/ops.md).
#pragma once

#include "../common/plugin_common.h"

namespace tokenskip {
namespace plugin {

// Offers the V2 build interface where the headers have it: hidden_out aliases hidden (in place, only
// the k updated rows are touched) when the engine is built with
// PreviewFeature::kALIASED_PLUGIN_IO_10_03; without it TensorRT gives a separate output and
// enqueue runs the one-pass copy kernel. enqueue picks the kernel by pointer equality, so both
// builds are correct.
class ScatterTokensPlugin final : public PluginBase<BuildV2> {
public:
    ScatterTokensPlugin() = default;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
#if TOKENSKIP_HAS_ALIASED_IO
    int32_t getAliasedInput(int32_t outputIndex) noexcept override;
#endif

    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    Fields mFields;
};

class ScatterTokensCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    ScatterTokensCreator();
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return mFields.get(); }
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    Fields mFields;
};

} // namespace plugin
} // namespace tokenskip
