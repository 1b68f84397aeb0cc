"""The deployed stack in moto that the operator's AWS command tests share (test_cli_aws.py,
test_stage_model.py): a CloudFormation stack with the outputs infra/stack.py declares, the SSE-KMS,
versioned data bucket, and a state machine named like the workflow (``<stack>-workflow``) that moto
really runs. The workflow's stand-in starts a training job the way the real one does; with ``spot`` in
the input it then waits (a run in progress), with ``instance_count`` it fails as a job out of memory
would, else it ends with a registered model package as the real one does.
"""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from ftstack.aws import DATA_PREFIX, OUTPUTS, SERVING_ROLE
from ftstack.cli import main

REGION = "us-east-1"
BUCKET = "ftstack-data"
PACKAGE_ARN = f"arn:aws:sagemaker:{REGION}:123456789012:model-package/ftstack-models/1"


def _definition(role: str) -> dict:
    train = {
        "Type": "Task", "Resource": "arn:aws:states:::aws-sdk:sagemaker:createTrainingJob", "ResultPath": "$.job",
        "Parameters": {
            "TrainingJobName.$": "States.Format('ftstack--{}-a0', $$.Execution.Name)", "RoleArn": role,
            "AlgorithmSpecification": {"TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/t:1",
                                       "TrainingInputMode": "File"},
            "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/executions/"},
            "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
            "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        },
        "Next": "Hold",
    }
    return {"StartAt": "Train", "States": {
        "Train": train,
        "Hold": {"Type": "Choice", "Choices": [{"Variable": "$.spot", "IsPresent": True, "Next": "WaitForJob"},
                                                {"Variable": "$.instance_count", "IsPresent": True, "Next": "TrainingFailed"}],
                 "Default": "Register"},
        "TrainingFailed": {"Type": "Fail", "Error": "TrainingFailed", "Cause": "CUDA out of memory"},
        "WaitForJob": {"Type": "Wait", "Seconds": 600, "End": True},
        "Register": {"Type": "Pass", "Result": {"arn": PACKAGE_ARN}, "ResultPath": "$.registered", "End": True},
    }}


def _template(state_machine: str, outputs: tuple[str, ...]) -> str:
    values = {"BucketName": BUCKET, "StateMachineArn": state_machine, "ModelPackageGroupName": "ftstack-models",
              "TrainingImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/t:1", "TopicArn": {"Ref": "Topic"},
              "DataPrefix": "team-a/", "ServingRoleArn": "arn:aws:iam::123456789012:role/ftstack-Serving"}
    return json.dumps({"Resources": {"Topic": {"Type": "AWS::SNS::Topic"}},
                       "Outputs": {key: {"Value": values[key]} for key in outputs}})


@pytest.fixture
def stack(monkeypatch, tmp_path):
    """A deployed stack in moto; yields the boto3 session the CLI gets and the state machine ARN."""
    monkeypatch.chdir(tmp_path)  # no cdk.json here: the default stack name applies
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        boto = boto3.Session(region_name=REGION)
        key = boto.client("kms").create_key()["KeyMetadata"]["Arn"]
        s3 = boto.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        s3.put_bucket_encryption(Bucket=BUCKET, ServerSideEncryptionConfiguration={"Rules": [{
            "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key},
            "BucketKeyEnabled": True}]})
        role = boto.client("iam").create_role(RoleName="workflow", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        machine = boto.client("stepfunctions").create_state_machine(
            name="ftstack-workflow", definition=json.dumps(_definition(role)), roleArn=role)["stateMachineArn"]
        cloudformation = boto.client("cloudformation")
        cloudformation.create_stack(StackName="ftstack", TemplateBody=_template(machine, tuple(OUTPUTS.values()) + (
            "TrainingImageUri", SERVING_ROLE)))
        cloudformation.create_stack(StackName="old", TemplateBody=_template(machine, ("BucketName",)))
        # A pipeline in a folder of a shared bucket (FineTuningPipelineProps.prefix).
        cloudformation.create_stack(StackName="team-a", TemplateBody=_template(machine, tuple(OUTPUTS.values()) + (
            "TrainingImageUri", DATA_PREFIX)))
        yield boto, machine, key


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def model_packages_as_documented(monkeypatch):
    """moto's UpdateModelPackage replaces a package's CustomerMetadataProperties with the request's
    (none, for an approval), where SageMaker adds the request's to them and removes only those named
    in CustomerMetadataPropertiesToRemove (the API reference of UpdateModelPackage). An approval
    there keeps model_manifest_sha256, which deploying checks."""
    from moto.sagemaker.models import SageMakerModelBackend

    original = SageMakerModelBackend.update_model_package

    def update(self, model_package_arn, model_approval_status, approval_description, customer_metadata_properties,
               customer_metadata_properties_to_remove, additional_inference_specifications_to_add):
        name = self.model_package_name_mapping.get(model_package_arn, model_package_arn)
        kept = dict(getattr(self.model_packages.get(name), "customer_metadata_properties", None) or {})
        return original(self, model_package_arn, model_approval_status, approval_description,
                        kept | (customer_metadata_properties or {}), customer_metadata_properties_to_remove,
                        additional_inference_specifications_to_add)

    monkeypatch.setattr(SageMakerModelBackend, "update_model_package", update)
