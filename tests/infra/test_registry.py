"""The ModelRegistry construct: a SageMaker model package group, on a bare stack."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template

from ftstack.infra.registry import ModelRegistry


@pytest.fixture(scope="module")
def built(new_stack):
    app, stack = new_stack("Registry")
    registry = ModelRegistry(stack, "Registry", group_name="ftstack-models", description="Models fine-tuned by ftstack")
    cdk.CfnOutput(stack, "GroupArn", value=registry.group_arn)
    return app, registry, Template.from_stack(stack)


def test_group_has_the_name_and_description(built):
    _, _, template = built
    template.resource_count_is("AWS::SageMaker::ModelPackageGroup", 1)
    template.has_resource_properties("AWS::SageMaker::ModelPackageGroup", {
        "ModelPackageGroupName": "ftstack-models",
        "ModelPackageGroupDescription": "Models fine-tuned by ftstack",
    })


def test_attributes(built):
    _, registry, template = built
    (group,) = template.find_resources("AWS::SageMaker::ModelPackageGroup")
    assert registry.group_name == "ftstack-models"
    assert isinstance(registry.group, cdk.aws_sagemaker.CfnModelPackageGroup)
    assert cdk.Token.is_unresolved(registry.group_arn)
    template.has_output("GroupArn", {"Value": {"Fn::GetAtt": [group, "ModelPackageGroupArn"]}})


@pytest.mark.parametrize("name", ["-models", "models-", "ft_stack", "x" * 64, ""])
def test_invalid_group_names_are_rejected(new_stack, name):
    _, stack = new_stack()
    with pytest.raises(ValueError, match="model package group name"):
        ModelRegistry(stack, "Registry", group_name=name, description="d")


def test_no_unacknowledged_cdk_nag_findings(built, nag_findings):
    assert nag_findings(built[0]) == []
